"""The low-latency backend (DeepEP's low-latency semantics): fixed buffers, no host sync.

Every (source, destination) pair of ranks has a buffer of ``C =
max_tokens_per_rank`` rows, so dispatch and combine are one equal-split
all-to-all each, with no count exchange, and every shape is known before the
data: nothing waits on the host, and the forward can be captured in a CUDA
graph (with ``grouped_mm`` experts, whose fused kernel torch runs for bf16 on
sm90/sm100; ``tests/test_capture_safety.py`` checks the host reads on the CPU).
Token rows and their routing (fp32 weights and local ids) travel packed as bytes
in one collective. A token goes once to each rank that holds one of its
experts; unused rows are padding (local ids -1). Passing more than ``C`` tokens
is an error naming the limit, on every rank (a header row in front of each
block carries it).
Shape legend: T tokens here, G ranks, C capacity, R = G*C buffer rows, k top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..collectives import _all_to_all, _joins_backward, all_to_all_v_start
from ..errors import InputError, Problem
from ..ops import capturing
from .base import META_BYTES, Deferred, Dispatcher, Received, Wire, header_of, settle

__all__ = ["LowLatencyDispatcher", "too_many_tokens"]


def too_many_tokens(T: int, C: int, rank: int) -> InputError:
    return InputError(Problem.TOO_MANY_TOKENS, T,
                      f"low_latency dispatch: {T} tokens on rank {rank} exceed "
                      f"max_tokens_per_rank={C} (MoEConfig); raise the limit or pass fewer "
                      "tokens per forward")


def _as_bytes(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.uint8)


class _PackedExchange(torch.autograd.Function):
    """One equal-split all-to-all of ``[x | weights | ids]`` packed per row as bytes;
    backward packs the gradients of x and the weights the same way."""

    @staticmethod
    def forward(ctx, x_RH, w_RK, ids_RK, head_2, group, G: int, codec):
        ctx.group, ctx.G, ctx.dtype = group, G, x_RH.dtype
        ctx.R, ctx.H, ctx.k = x_RH.shape[0], x_RH.shape[1], w_RK.shape[1]
        payload = codec.encode(x_RH) if codec is not None else x_RH
        packed = torch.cat([_as_bytes(payload), _as_bytes(w_RK.float()),
                            _as_bytes(ids_RK.float())], dim=1)
        R, B = packed.shape
        # One header row in front of each destination's block: this rank's problem
        # and detail as fp32 (exact for these ints) in its first 8 bytes (B >= 8k).
        head_row = packed.new_zeros((1, B))
        head_row[0, :8] = _as_bytes(head_2.float())
        blocks = torch.cat([head_row.expand(G, 1, B), packed.view(G, R // G, B)], dim=1)
        got = _all_to_all(blocks.reshape(-1, B), [R // G + 1] * G, [R // G + 1] * G, group)
        got = got.view(G, R // G + 1, B)
        heads_G2 = got[:, 0, :8].contiguous().view(torch.float32)
        got = got[:, 1:].reshape(R, B)
        nx, k = _as_bytes(payload).shape[1], ctx.k
        x = got[:, :nx].contiguous().view(payload.dtype)
        x = codec.decode(x) if codec is not None else x
        w = got[:, nx : nx + 4 * k].contiguous().view(torch.float32)
        ids = got[:, nx + 4 * k :].contiguous().view(torch.float32)
        ctx.mark_non_differentiable(ids, heads_G2)
        return x, w, ids, heads_G2

    @staticmethod
    def backward(ctx, gx, gw, _gids, _gheads):
        G, H = ctx.G, ctx.H
        if gx is None:  # an output that fed nothing: its gradient is zero
            gx = torch.zeros((ctx.R, H), dtype=ctx.dtype, device=gw.device)
        if gw is None:
            gw = torch.zeros((ctx.R, ctx.k), dtype=torch.float32, device=gx.device)
        packed = torch.cat([_as_bytes(gx.to(ctx.dtype)), _as_bytes(gw.float())], dim=1)
        R = packed.shape[0]
        got = _all_to_all(packed, [R // G] * G, [R // G] * G, ctx.group)
        nx = H * torch.empty((), dtype=ctx.dtype).element_size()
        gx_back = got[:, :nx].contiguous().view(ctx.dtype)
        gw_back = got[:, nx:].contiguous().view(torch.float32)
        return gx_back, gw_back, None, None, None, None, None


@dataclass(frozen=True, eq=False)
class LowLatencyHandle:
    hits_TG: Tensor  # token t has an expert on rank g
    pos_TG: Tensor  # its row in the buffer for rank g (R, the trash row, when not)
    row_bytes: int  # bytes of one packed dispatch row
    out_bytes: int  # bytes of one partial-output row in combine


class LowLatencyDispatcher(Dispatcher):
    name = "low_latency"
    fixed_shapes = True

    def start(self, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor,
              error: InputError | None = None, more: bool = False) -> Deferred:
        T, k = ids_TK.shape
        G, C, H = self.G, self.config.max_tokens_per_rank, x_TH.shape[1]
        if T > C and error is None:  # host-side shapes only: no sync
            error = too_many_tokens(T, C, self.state.rank)
        if error is not None:  # join the exchange with no tokens, then raise everywhere
            x_TH, weights_TK, ids_TK, T = x_TH[:0], weights_TK[:0], ids_TK[:0], 0
        R, dev = G * C, x_TH.device
        owner_TK = self.owner_E[ids_TK]
        ranks = torch.arange(G, device=dev)
        here_TGK = owner_TK.unsqueeze(1) == ranks.view(1, G, 1)  # slot's expert on rank g
        hits_TG = here_TGK.any(dim=2)
        pos_TG = torch.where(hits_TG, ranks * C + hits_TG.cumsum(0) - 1, R)  # R: trash
        local_TGK = torch.where(here_TGK, self.local_index_E[ids_TK].unsqueeze(1), -1)
        w_TGK = torch.where(here_TGK, weights_TK.unsqueeze(1), 0.0)
        pos = pos_TG.reshape(-1)
        x_buf = x_TH.new_zeros((R + 1, H)).index_copy(
            0, pos, x_TH.unsqueeze(1).expand(T, G, H).reshape(T * G, H))[:R]
        w_buf = weights_TK.new_zeros((R + 1, k), dtype=torch.float32).index_copy(
            0, pos, w_TGK.reshape(T * G, k).float())[:R]
        ids_buf = torch.full((R + 1, k), -1.0, device=dev).index_copy(
            0, pos, local_TGK.reshape(T * G, k).float())[:R]
        # No chunks here (at most C tokens): the header is [problem, detail], made on
        # the device (zeros; an error's numbers filled in as kernel arguments) and not
        # copied from the host, which a stream under CUDA-graph capture does not allow.
        problem, detail, _ = header_of(error, False)
        head_2 = torch.zeros(2, dtype=torch.int64, device=dev)
        if problem:
            head_2[0].fill_(problem)
            head_2[1].fill_(detail)
        if G == 1:  # nothing travels
            x_R, w_R, ids_R, heads_G2 = x_buf, w_buf, ids_buf, head_2.view(1, 2)
        else:
            x_buf, w_buf = _joins_backward(x_buf), _joins_backward(w_buf)
            x_R, w_R, ids_R, heads_G2 = _PackedExchange.apply(x_buf, w_buf, ids_buf, head_2,
                                                              self.group, G, self.codec)
        if capturing():
            if error is not None:  # in a CUDA graph: nothing is read on the host
                raise error
        else:  # NOTE: reads G*2 numbers on the host (free on the CPU)
            settle([[int(p), int(d), 0] for p, d in heads_G2.tolist()], error,
                   self.state.ep_ranks, self.where)
        handle = LowLatencyHandle(hits_TG, pos_TG,
                                  self.token_bytes(H) + META_BYTES * k, self.partial_bytes(H))
        return Deferred(lambda: (Received(x_R, ids_R.long(), w_R), handle))

    def combine_start(self, partial_RH: Tensor, handle: LowLatencyHandle) -> Deferred:
        G, R = self.G, partial_RH.shape[0]
        back = all_to_all_v_start(partial_RH, [R // G] * G, [R // G] * G, self.group)

        def summed() -> Tensor:
            h = handle
            back_RH = back.wait()
            T, H = h.pos_TG.shape[0], back_RH.shape[1]
            rows_TGH = back_RH.index_select(0, h.pos_TG.clamp(max=R - 1).reshape(-1))
            acc = torch.promote_types(partial_RH.dtype, torch.float32)
            rows_TGH = rows_TGH.view(T, G, H).to(acc)
            y = torch.where(h.hits_TG.unsqueeze(2), rows_TGH, 0.0).sum(1)  # fixed order
            return y.to(partial_RH.dtype)

        return Deferred(summed)

    def wire(self, handle: LowLatencyHandle) -> Wire:
        C = self.config.max_tokens_per_rank
        # Each block is C rows and its header row.
        return Wire([C] * self.G, [C] * self.G, [(C + 1) * handle.row_bytes] * self.G,
                    [C * handle.out_bytes] * self.G)
