"""A paged KV cache and the attention that reads it, for transformers' own attention modules.

Shape legend:

    T = tokens of one step, all sequences packed in one row    B = 1-token segments
    L = longest context among the 1-token segments              S = slots (token places)
    h = query heads    g = key/value heads    d = head size (dk for keys, dv for values)

The model runs as transformers wrote it, on one packed row ``input_ids [1, T]``
with each token's own ``position_ids``; only its attention function is ours
(registered with transformers' ``AttentionInterface`` as ``"epmoe_paged"``).
That function writes the step's keys and values into this cache at the
tokens' slots, then lets each query see its own sequence's keys: the 1-token
segments (decode, and prompts' last tokens) together, as one batched
``scaled_dot_product_attention`` over their gathered contexts, and longer
segments (prefill chunks) one by one with a causal mask offset by what the
sequence has cached. The cache is a pool of ``block_size``-token blocks per
attention layer; a sequence holds a list of blocks (vLLM's paged attention,
with the gather done by indexing rather than a kernel).

Not for models whose layers keep other state (linear attention, Mamba): see
:func:`check_attention_only`.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ATTN_IMPLEMENTATION", "BlockAllocator", "KVCache", "StepBatch",
           "check_attention_only", "paged_attention", "step_batch"]

ATTN_IMPLEMENTATION = "epmoe_paged"
_CURRENT: contextvars.ContextVar[StepBatch | None] = contextvars.ContextVar("epmoe_step",
                                                                           default=None)


class BlockAllocator:
    """Free list of cache blocks. Pure bookkeeping; the engine's scheduler reserves
    blocks for a request's whole length (prompt + max_tokens) on admission."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"{n} KV blocks asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class StepBatch:
    """Where one step's tokens go and what each query may see (built by :func:`step_batch`)."""

    cache: KVCache
    slots_T: Tensor  # [T] each token's slot
    num_single: int  # the first B segments have one token each (rows 0..B-1)
    single_slots_BL: Tensor  # [B, L] context slots of those segments (padded with 0)
    single_mask_BL: Tensor  # [B, L] True where a key belongs to the context
    single_pos_B: Tensor  # [B] the query's position (for sliding windows)
    multi: list[tuple[int, int, Tensor]]  # (first row, q_len, context slots [ctx]) per chunk


def _slot_of(blocks_S: np.ndarray, first_S: np.ndarray, pos: np.ndarray, seg: np.ndarray,
             block_size: int) -> np.ndarray:
    """The cache slot of position ``pos`` of segment ``seg`` (arrays of one shape), from
    all segments' blocks laid end to end (``first_S[s]``: where segment s's start)."""
    return blocks_S[first_S[seg] + pos // block_size] * block_size + pos % block_size


def step_batch(cache: KVCache, segments: list[tuple[list[int], int, int]]) -> StepBatch:
    """``segments``: per sequence in packed order (1-token segments first), its blocks,
    the tokens already cached, and the tokens this step adds.

    Index arithmetic in numpy on the host, then one copy per tensor to the device: a
    few tensors per step instead of a few per sequence (3 ms a step at 128 sequences)."""
    bs, dev = cache.block_size, cache.device
    start = np.array([st for _, st, _ in segments], dtype=np.int64)
    n = np.array([k for _, _, k in segments], dtype=np.int64)
    B = int(np.argmax(n != 1)) if (n != 1).any() else len(segments)  # leading 1-token ones
    if (n[B:] == 1).any():
        raise ValueError("1-token segments must come first in a step")
    blocks_S = np.fromiter((b for blocks, _, _ in segments for b in blocks), dtype=np.int64)
    first_S = np.cumsum([0] + [len(blocks) for blocks, _, _ in segments[:-1]], dtype=np.int64)
    seg_T = np.repeat(np.arange(len(segments)), n)  # each token's segment
    row0 = np.cumsum(n) - n  # each segment's first row
    pos_T = start[seg_T] + np.arange(int(n.sum())) - row0[seg_T]
    slots_T = _slot_of(blocks_S, first_S, pos_T, seg_T, bs)
    ctx_B = start[:B] + 1  # the 1-token segments' contexts, padded to the longest
    L = int(ctx_B.max()) if B else 0
    pos_BL = np.minimum(np.arange(L)[None, :], ctx_B[:, None] - 1)
    mask_BL = np.arange(L)[None, :] < ctx_B[:, None]
    slots_BL = np.where(mask_BL, _slot_of(blocks_S, first_S, pos_BL,
                                          np.arange(B)[:, None], bs), 0)
    multi = []
    for s in range(B, len(segments)):
        ctx = _slot_of(blocks_S, first_S, np.arange(start[s] + n[s]), s, bs)
        multi.append((int(row0[s]), int(n[s]), torch.from_numpy(ctx).to(dev)))

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    return StepBatch(cache, t(slots_T), B, t(slots_BL.reshape(B, L)),
                     t(mask_BL.reshape(B, L)), t(ctx_B - 1), multi)


class KVCache:
    """Per attention layer, key and value pools of ``num_blocks * block_size`` slots.

    The pools are made on the first write of each layer, from that write's shapes
    (so any head count and key/value sizes work, MLA's included);
    ``bytes_per_token`` comes from a probe step before any block is handed out.
    """

    def __init__(self, num_blocks: int, block_size: int, device: torch.device) -> None:
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        self.k: dict[int, Tensor] = {}  # layer -> [S, g, dk]
        self.v: dict[int, Tensor] = {}  # layer -> [S, g, dv]

    def pools(self, layer: int, k_gT: Tensor, v_gT: Tensor) -> tuple[Tensor, Tensor]:
        if layer not in self.k:
            S = self.num_blocks * self.block_size
            # torch.empty: pages are touched only as blocks fill, so memory follows use.
            self.k[layer] = k_gT.new_empty((S, k_gT.shape[0], k_gT.shape[2]))
            self.v[layer] = v_gT.new_empty((S, v_gT.shape[0], v_gT.shape[2]))
        return self.k[layer], self.v[layer]

    @property
    def bytes_per_token(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (*self.k.values(),
                                                             *self.v.values()))


class using:
    """``with using(batch): model(...)``: the attention calls of that forward see ``batch``."""

    def __init__(self, batch: StepBatch) -> None:
        self.batch = batch

    def __enter__(self) -> StepBatch:
        self._token = _CURRENT.set(self.batch)
        return self.batch

    def __exit__(self, *exc) -> None:
        _CURRENT.reset(self._token)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None,
            sinks: Tensor | None) -> Tensor:
    """``q [N, h, Q, dk]``, ``k [N, g, K, dk]``, ``v [N, g, K, dv]``, ``mask [N|1, 1, Q, K]``
    (True: may attend) -> ``[N, h, Q, dv]``. With ``sinks [h]`` (GPT-OSS), a per-head
    extra logit joins the softmax and is dropped after it, as transformers computes it.

    Single queries (decode) and sinks take explicit products in the model's dtype and
    an fp32 softmax (transformers' eager attention): CPU's fused kernel spent 4.5 ms
    per call on 16 decode queries of ~150 keys with a mask (its blocking is for long
    queries); the products take a fraction of that."""
    N, h, Q, dk = q.shape
    g = k.shape[1]
    if sinks is None and Q > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=h != g)
    scale = dk ** -0.5 if scale is None else scale
    q_g = q.reshape(N, g, (h // g) * Q, dk)  # a group's query heads share its keys
    w = (q_g @ k.transpose(2, 3)).float() * scale  # [N, g, (h/g)*Q, K]
    w = w.view(N, g, h // g, Q, -1).masked_fill(~mask.unsqueeze(1), float("-inf"))
    if sinks is not None:
        s = sinks.float().reshape(1, g, h // g, 1, 1).expand(N, -1, -1, Q, 1)
        w = torch.cat([w, s], dim=-1)
    p = torch.softmax(w, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    out = p.to(v.dtype).reshape(N, g, (h // g) * Q, -1) @ v  # [N, g, (h/g)*Q, dv]
    return out.view(N, h, Q, -1)


def paged_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: ``query [1, h, T, dk]``, ``key [1, g, T,
    dk]``, ``value [1, g, T, dv]`` of this step's tokens -> ``([1, T, h, dv], None)``."""
    batch = _CURRENT.get()
    if batch is None:  # a forward outside the engine (the probe step has a batch too)
        raise RuntimeError("epmoe_paged attention runs only inside the serving engine's step")
    k_gT, v_gT = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, g, d]
    k_S, v_S = batch.cache.pools(module.layer_idx, key[0], value[0])
    # One copy of this step's keys and values into their slots.
    k_S.index_copy_(0, batch.slots_T, k_gT.to(k_S.dtype))
    v_S.index_copy_(0, batch.slots_T, v_gT.to(v_S.dtype))
    window = kwargs.get("sliding_window")
    sinks = kwargs.get("s_aux")
    q_hT = query[0]
    out_Thd = query.new_empty((q_hT.shape[1], q_hT.shape[0], v_S.shape[2]))
    B = batch.num_single
    if B:
        # NOTE: a gather of every 1-token segment's context, [B, L, g, d]: the price of
        # paging without a kernel. Padded keys are masked out.
        B_, L = batch.single_slots_BL.shape
        flat = batch.single_slots_BL.reshape(-1)
        # index_select and one contiguous copy: the products below then need no copy of
        # their own (advanced indexing and strided batches each cost more on the CPU).
        k_B = k_S.index_select(0, flat).view(B_, L, *k_S.shape[1:]).transpose(1, 2).contiguous()
        v_B = v_S.index_select(0, flat).view(B_, L, *v_S.shape[1:]).transpose(1, 2).contiguous()
        mask = batch.single_mask_BL
        if window:
            keep = torch.arange(mask.shape[1], device=mask.device) > \
                (batch.single_pos_B[:, None] - window)
            mask = mask & keep
        q_B = q_hT[:, :B].transpose(0, 1).unsqueeze(2)  # [B, h, 1, dk]
        out_Thd[:B] = _attend(q_B, k_B, v_B, mask[:, None, None, :], scaling, sinks)[:, :, 0]
    for row, n, ctx in batch.multi:
        K = len(ctx)
        k_1 = k_S[ctx].transpose(0, 1).unsqueeze(0)  # [1, g, K, dk]
        v_1 = v_S[ctx].transpose(0, 1).unsqueeze(0)
        q_pos = torch.arange(K - n, K, device=ctx.device)[:, None]  # [n, 1]
        k_pos = torch.arange(K, device=ctx.device)[None, :]  # [1, K]
        mask = k_pos <= q_pos
        if window:
            mask = mask & (k_pos > q_pos - window)
        q_1 = q_hT[:, row : row + n].unsqueeze(0)  # [1, h, n, dk]
        out_Thd[row : row + n] = _attend(q_1, k_1, v_1, mask[None, None], scaling,
                                         sinks)[0].transpose(0, 1)
    return out_Thd.unsqueeze(0), None


def check_attention_only(hf_config) -> None:
    """Refuse, by name, a model with layers the paged cache does not run: layers that keep
    state other than keys and values (linear attention, Mamba, convolutions), and attention
    that sees other than the causal past or a sliding window of it (Llama 4's chunks,
    DeepSeek-V3.2's indexed sparse attention)."""
    kinds = set(getattr(hf_config.get_text_config(), "layer_types", None) or ())
    other = kinds - {"full_attention", "sliding_attention"}
    if other:
        raise ValueError(f"serving supports full and sliding-window attention layers only; "
                         f"{hf_config.model_type} has {sorted(other)} layers (recurrent state, "
                         "chunked or indexed attention: not in the paged KV cache); "
                         "epmoe.from_pretrained and transformers' generate run it")
