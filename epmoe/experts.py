"""Expert math on one rank: initialise experts, run the local experts on received tokens.

Pure local code, no collectives. Shape legend:

    N = token rows received by this rank     k = top_k slots per row
    M = (row, slot) pairs that name a local expert, sorted by local expert
    e = local experts    E = all experts    H = hidden size
    F = intermediate size per expert         Fs = shared-expert intermediate size

Each expert's gate and up projections are one fused ``[2F, H]`` matrix (gate
rows, then up rows): one matrix product instead of two. The local experts run
either as a loop of one product per expert over contiguous slices of the
sorted rows (``"loop"``) or as one grouped product (``"grouped_mm"``,
``torch.nn.functional.grouped_mm``); ``choose_expert_impl`` picks per device
and dtype from measurements (``benchmarks/expert_impl.py``). Weights prepacked
for oneDNN (:class:`PackedExperts`, made by ``epmoe.packed``) run through
:func:`packed_experts`, which repeats whichever of these paths was chosen with
the same bits.

The routing weight multiplies each expert's output (:func:`weigh`), or with
``MoEConfig.weigh_input`` (Llama 4) its input rows (:func:`weigh_rows`), before
any of these paths runs, so every path computes the same thing either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MoEConfig
from .experts_packed import PackedExperts, packed_experts
from .ops import by_tiles, sum_rows

__all__ = [
    "ExpertWeights",
    "PackedExperts",
    "choose_expert_impl",
    "expert_mlp",
    "gated_activation",
    "grouped_experts",
    "grouped_mm_fast",
    "grouped_mm_ok",
    "init_expert",
    "init_router",
    "init_shared",
    "local_experts_forward",
    "local_experts_forward_fixed",
    "packed_experts",
    "run_experts",
    "sort_by_local_expert",
    "weigh",
    "weigh_rows",
]

GLU = Callable[[Tensor, Tensor], Tensor]  # (gate activations, up activations) -> [M, F]


class ExpertWeights(NamedTuple):
    """Stacked weights of some experts, in ``nn.Linear`` orientation."""

    w_gate_up: Tensor  # [e, 2F, H]: gate rows 0..F-1, up rows F..2F-1
    w_down: Tensor  # [e, H, F]
    b_gate_up: Tensor | None = None  # [e, 2F] (expert_bias only)
    b_down: Tensor | None = None  # [e, H]


def gated_activation(config: MoEConfig) -> GLU:
    """The gated product of an expert: ``act(gate) * up`` or GPT-OSS's clamped SwiGLU."""
    if config.activation == "silu":
        def swiglu(g: Tensor, u: Tensor) -> Tensor:
            return F.silu(g).mul_(u)  # one new [M, F] tensor, then in place

        # Without autograd the gate activations themselves can be overwritten: no
        # new tensor at all (measured 4% faster on the Mixtral-like expert).
        swiglu.in_place = lambda g, u: F.silu(g, inplace=True).mul_(u)
        return swiglu
    if config.activation == "gelu":
        return lambda g, u: F.gelu(g).mul_(u)
    alpha, limit = config.swiglu_alpha, config.swiglu_limit

    def clamped_swiglu(g: Tensor, u: Tensor) -> Tensor:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))

    return clamped_swiglu


def expert_mlp(x_MH: Tensor, w_gate_up_2FH: Tensor, w_down_HF: Tensor, glu: GLU,
               b_gate_up: Tensor | None = None, b_down: Tensor | None = None) -> Tensor:
    """One gated-MLP expert: ``down(glu(gate(x), up(x)))`` -> ``[M, H]``."""
    gate_MF, up_MF = F.linear(x_MH, w_gate_up_2FH, b_gate_up).chunk(2, dim=1)
    return F.linear(glu(gate_MF, up_MF), w_down_HF, b_down)


# --------------------------------------------------------------------------- init


def _generator(seed: int, stream: int) -> torch.Generator:
    # One independent stream per (seed, owner): stream 0 is the router, 1 + e
    # is global expert e, 1 + E the shared expert. Any rank builds any part alone.
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def _uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def init_router(config: MoEConfig, seed: int) -> dict[str, Tensor]:
    """``router_weight [E, H]`` and, when configured, ``router_bias`` and
    ``score_correction_bias`` ``[E]``: fp32 on the CPU, the same on every rank."""
    E, H = config.num_experts, config.hidden_size
    gen = _generator(seed, 0)
    out = {"router_weight": _uniform((E, H), H, gen)}
    if config.router_bias:
        out["router_bias"] = _uniform((E,), H, gen)
    if config.score_correction_bias:
        out["score_correction_bias"] = 0.1 * torch.rand(E, generator=gen)
    return out


def init_expert(config: MoEConfig, seed: int, expert: int) -> dict[str, Tensor]:
    """Weights of global expert ``expert``, by full-weight name: ``w_gate [F, H]``,
    ``w_up [F, H]``, ``w_down [H, F]`` (and ``b_gate``, ``b_up`` ``[F]``, ``b_down
    [H]`` with ``expert_bias``), fp32 on the CPU.

    Depends only on (seed, expert), so a rank builds its own experts without
    materialising anyone else's and the result matches a full single-device init.
    """
    H, Fi = config.hidden_size, config.intermediate_size
    gen = _generator(seed, 1 + expert)
    out = {"w_gate": _uniform((Fi, H), H, gen), "w_up": _uniform((Fi, H), H, gen),
           "w_down": _uniform((H, Fi), Fi, gen)}
    if config.expert_bias:
        out.update(b_gate=_uniform((Fi,), H, gen), b_up=_uniform((Fi,), H, gen),
                   b_down=_uniform((H,), Fi, gen))
    return out


def init_shared(config: MoEConfig, seed: int) -> dict[str, Tensor]:
    """The shared expert: ``shared_gate [Fs, H]``, ``shared_up [Fs, H]``, ``shared_down
    [H, Fs]`` and, when configured, ``shared_expert_gate [1, H]``; empty if none."""
    H, Fs = config.hidden_size, config.shared_intermediate_size
    if not Fs:
        return {}
    gen = _generator(seed, 1 + config.num_experts)
    out = {"shared_gate": _uniform((Fs, H), H, gen), "shared_up": _uniform((Fs, H), H, gen),
           "shared_down": _uniform((H, Fs), Fs, gen)}
    if config.shared_expert_gate:
        out["shared_expert_gate"] = _uniform((1, H), H, gen)
    return out


# --------------------------------------------------------------------------- compute


def grouped_mm_ok(experts: ExpertWeights) -> bool:
    """``grouped_mm`` exists here and these weights' rows are 16-byte aligned (its CPU
    kernels require that)."""
    if isinstance(experts, PackedExperts):  # (decided when packed, from the plain stacks)
        return experts.grouped_ok
    w = experts.w_gate_up
    Fi, H = experts.w_down.shape[2], w.shape[2]
    return hasattr(F, "grouped_mm") and all(n * w.element_size() % 16 == 0 for n in (H, Fi))


LOOP_MIN_ROWS = 512  # CPU: from this many rows per local expert on average, the loop wins


def choose_expert_impl(device: torch.device, dtype: torch.dtype) -> str:
    """What ``expert_impl="auto"`` means on a device: ``"grouped_mm"``, ``"loop"``, or
    ``"auto_rows"`` (decided per forward from the rows per local expert).

    CPU (``benchmarks/expert_impl.py``, figures in ``benchmarks/RESULTS.md``):
    in bf16 and fp32 alike the loop is faster with many rows per expert (Mixtral
    prefill, 1024 rows each: 71 against 99 ms in bf16) and grouped_mm with few
    rows or many experts (decode; DeepSeek's 32 local experts), hence a
    threshold of ``LOOP_MIN_ROWS`` rows per expert. CUDA: grouped_mm where torch
    runs its fused kernel (:func:`grouped_mm_fast`), the loop otherwise (not
    measured here: no GPU).
    """
    if not hasattr(F, "grouped_mm"):
        return "loop"
    if device.type == "cpu":
        return "auto_rows"
    return "grouped_mm" if grouped_mm_fast(device, dtype) else "loop"


def grouped_mm_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch runs ``grouped_mm`` on ``device`` with its fused kernel, which reads
    nothing on the host (CUDA-graph safe): CUDA, bf16, compute capability 9.x or 10.x
    (torch 2.13's ``_grouped_mm_cuda``). Elsewhere on CUDA (sm80, sm89, sm120; fp32, fp16)
    torch falls back to one product per expert after copying the offsets to the host."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def sort_by_local_expert(local_ids_NK: Tensor, num_local: int) -> tuple[Tensor, list[int]]:
    """Order the (row, slot) pairs that name a local expert by that expert.

    ``local_ids_NK[n, j]`` is the local expert of slot j of received row n, or
    -1 when that slot's expert lives elsewhere. Returns ``pair_M``, flat indices
    ``n * k + j`` grouped by local expert (rows ascending inside a group), and
    the number of pairs per local expert.

    >>> sort_by_local_expert(torch.tensor([[1, -1], [0, 1]]), 2)
    (tensor([2, 0, 3]), [1, 2])
    """
    ids = local_ids_NK.flatten()  # [N*k]
    key = torch.where(ids >= 0, ids, num_local)  # absent slots sort last, in bucket e
    order = torch.argsort(key, stable=True)  # [N*k]
    # NOTE: host sync, once per forward: the slice bounds of every local expert.
    counts = torch.bincount(key, minlength=num_local + 1).tolist()
    return order[: sum(counts[:num_local])], counts[:num_local]


def grouped_experts(x_MH: Tensor, offs_e: Tensor, expert_M: Tensor | None,
                    experts: ExpertWeights, glu: GLU, valid_M1: Tensor | None = None) -> Tensor:
    """All local experts as two grouped products: rows ``x_MH`` sorted by expert, expert i's
    rows ending at ``offs_e[i]`` (int32, on the device: no host sync). Rows past the last
    offset come out undefined (``valid_M1`` marks the others, for the biases' gradient).
    ``expert_M``, each row's expert, is needed for biases."""
    Fi = experts.w_down.shape[2]

    def bias(b: Tensor) -> Tensor:  # grouped_mm has no bias yet: gather it per row
        rows = b.index_select(0, expert_M)
        return rows if valid_M1 is None else torch.where(valid_M1, rows, 0.0)

    gu_M2F = F.grouped_mm(x_MH, experts.w_gate_up.transpose(1, 2), offs=offs_e)
    if experts.b_gate_up is not None:
        gu_M2F = gu_M2F + bias(experts.b_gate_up)
    y_MH = F.grouped_mm(glu(gu_M2F[:, :Fi], gu_M2F[:, Fi:]), experts.w_down.transpose(1, 2),
                        offs=offs_e)
    if experts.b_down is not None:
        y_MH = y_MH + bias(experts.b_down)
    return y_MH


def invariant_experts(x_MH: Tensor, counts: list[int], experts: ExpertWeights,
                      glu: GLU) -> Tensor:
    """:func:`run_experts` with results that depend only on each row and its expert, not on
    the other rows in the batch (``MoEConfig.batch_invariant``): each expert's MLP runs
    on fixed-size tiles (:func:`~epmoe.ops.by_tiles`). A row then gives the same bits
    wherever the router, a rebalance or a copy sends it."""
    outs, start = [], 0
    for i, n in enumerate(counts):  # (empty slices too, as in the loop)
        biases = [None if b is None else b[i] for b in experts[2:]]
        w_gu, w_d = experts.w_gate_up[i], experts.w_down[i]
        outs.append(by_tiles(lambda t, w_gu=w_gu, w_d=w_d, biases=biases:
                             expert_mlp(t, w_gu, w_d, glu, *biases), x_MH[start : start + n]))
        start += n
    return torch.cat(outs)


def run_experts(x_MH: Tensor, counts: list[int], experts: ExpertWeights, glu: GLU,
                impl: str) -> Tensor:
    """Rows ``x_MH`` sorted by local expert (``counts[i]`` rows for expert i) -> ``[M, H]``.
    ``impl``: ``"loop"``, ``"grouped_mm"`` or ``"invariant"`` (:func:`invariant_experts`)."""
    if isinstance(experts, PackedExperts):
        return packed_experts(x_MH, counts, experts, glu, impl)
    if impl == "invariant":
        return invariant_experts(x_MH, counts, experts, glu)
    if impl == "grouped_mm":
        counts_t = torch.tensor(counts, dtype=torch.int32)
        offs = counts_t.cumsum(0, dtype=torch.int32).to(x_MH.device, non_blocking=True)
        expert_M = None
        if experts.b_gate_up is not None:
            expert_M = torch.repeat_interleave(torch.arange(len(counts)), counts_t.long())
            expert_M = expert_M.to(x_MH.device, non_blocking=True)
        return grouped_experts(x_MH, offs, expert_M, experts, glu)
    if not torch.is_grad_enabled() and experts.b_down is None:  # write in place, no cat
        Fi = experts.w_down.shape[2]
        act = getattr(glu, "in_place", glu)  # no autograd here: overwrite the gate half
        out, start = x_MH.new_empty((x_MH.shape[0], experts.w_down.shape[1])), 0
        for i, n in enumerate(counts):
            if n:
                gu = F.linear(x_MH[start : start + n], experts.w_gate_up[i],
                              None if experts.b_gate_up is None else experts.b_gate_up[i])
                torch.matmul(act(gu[:, :Fi], gu[:, Fi:]), experts.w_down[i].T,
                             out=out[start : start + n])
            start += n
        return out
    if experts.b_gate_up is None and experts.b_down is None:  # (no biases: one node)
        return _ExpertLoop.apply(x_MH, experts.w_gate_up, experts.w_down, counts, glu)
    # Under autograd: the stacks unbound and the rows split once (not indexed per expert),
    # so that the backward assembles each stacked gradient in one pass, instead of
    # zero-filling and adding one full-size gradient per expert (a third of the backward).
    e = len(counts)
    none = [None] * e
    parts = zip(x_MH.split(counts), experts.w_gate_up.unbind(0), experts.w_down.unbind(0),
                *[none if b is None else b.unbind(0) for b in experts[2:]], strict=True)
    # Empty splits run too: every rank's graph then has the same shape, so every rank
    # joins the same collectives in backward (see all_to_all_v).
    return torch.cat([expert_mlp(x, wgu, wd, glu, bgu, bd)  # loop over experts, not tokens
                      for x, wgu, wd, bgu, bd in parts])


def _lhs(t_T: Tensor) -> Tensor:
    """A transposed left operand, made contiguous when not fp32: on this CPU (AMX) a bf16
    product with a transposed left operand took 1.3-1.8x as long as the copy and the
    product together; in fp32 the copy cost about 5% more."""
    return t_T if t_T.dtype == torch.float32 else t_T.contiguous()


class _ExpertLoop(torch.autograd.Function):
    """The loop of expert MLPs (no biases) as one autograd node.

    Forward: a product per expert into one ``[M, 2F]`` and one ``[M, H]`` buffer.
    Backward: per expert, the products of the input and weight gradients written
    straight into the stacked gradients (``out=``), the activation's derivative by
    autograd on the saved gate/up rows. The generic loop's backward instead
    zero-fills and adds a full-size stacked gradient per expert, and assembles the
    row gradients from splits: with it, a third of the backward was not products
    (``benchmarks/fwd_bwd.py``). The same products in the same dtype: the same
    gradients. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x_MH, w_gate_up_e2FH, w_down_eHF, counts, glu):
        M, H, Fi = x_MH.shape[0], w_down_eHF.shape[1], w_down_eHF.shape[2]
        gu_M2F = x_MH.new_empty((M, 2 * Fi))
        out_MH = x_MH.new_empty((M, H))
        start = 0
        for i, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.matmul(x_MH[rows], w_gate_up_e2FH[i].T, out=gu_M2F[rows])
                gate, up = gu_M2F[rows].chunk(2, dim=1)
                torch.matmul(glu(gate, up), w_down_eHF[i].T, out=out_MH[rows])
            start += n
        ctx.save_for_backward(x_MH, w_gate_up_e2FH, w_down_eHF, gu_M2F)
        ctx.counts, ctx.glu = list(counts), glu
        return out_MH

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_MH):
        x_MH, w_gu, w_d, gu_M2F = ctx.saved_tensors
        need_x, need_gu, need_d = ctx.needs_input_grad[:3]
        g_MH = g_MH.contiguous()
        dx = torch.empty_like(x_MH) if need_x else None  # (every row is some expert's)
        dw_gu = torch.empty_like(w_gu) if need_gu else None  # (every expert's written:
        dw_d = torch.empty_like(w_d) if need_d else None  #    by a product, or zeros)
        start = 0
        for i, n in enumerate(ctx.counts):
            if not n:
                for dw in (dw_gu, dw_d):
                    if dw is not None:
                        dw[i].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            with torch.enable_grad():
                gu = gu_M2F[rows].detach().requires_grad_(True)
                act_MF = ctx.glu(*gu.chunk(2, dim=1))
            if need_d:
                torch.matmul(_lhs(g_MH[rows].T), act_MF.detach(), out=dw_d[i])
            if need_x or need_gu:
                (d_gu,) = torch.autograd.grad(act_MF, gu, g_MH[rows] @ w_d[i])
                if need_gu:
                    torch.matmul(_lhs(d_gu.T), x_MH[rows], out=dw_gu[i])
                if need_x:
                    torch.matmul(d_gu, w_gu[i], out=dx[rows])
        return dx, dw_gu, dw_d, None, None


def weigh(y_MH: Tensor, w_M: Tensor, in_fp32: bool,
          accumulate: torch.dtype | None = None) -> Tensor:
    """Each output row times its fp32 routing weight: in ``y``'s dtype, the weight
    rounded first (in place when no gradient is needed: no fp32 copy of y), or, with
    ``in_fp32``, in fp32 (the result stays fp32, for a fp32 sum), or in ``accumulate``
    (a wider dtype, in which the product of two fp32 numbers is exact for float64)."""
    if accumulate is not None and accumulate != y_MH.dtype:
        return y_MH.to(accumulate) * w_M.to(accumulate).unsqueeze(1)
    if in_fp32 and y_MH.dtype != torch.float32:
        return y_MH.float() * w_M.float().unsqueeze(1)
    w_M1 = w_M.to(y_MH.dtype).unsqueeze(1)
    return y_MH.mul_(w_M1) if not y_MH.requires_grad else y_MH * w_M1


def weigh_rows(x_MH: Tensor, w_M: Tensor) -> Tensor:
    """``MoEConfig.weigh_input``: each gathered input row times its routing weight, in
    ``x``'s dtype, the weight rounded first, as transformers' Llama 4 does (its router
    casts the sigmoid scores to the model's dtype; ``routed_in = hidden * score``).
    ``x_MH`` is a fresh gather: overwritten in place when no gradient is needed."""
    w_M1 = w_M.to(x_MH.dtype).unsqueeze(1)
    return x_MH.mul_(w_M1) if not torch.is_grad_enabled() else x_MH * w_M1


def _unweighted(y_MH: Tensor, in_fp32: bool, accumulate: torch.dtype | None) -> Tensor:
    """``weigh`` for outputs whose inputs were weighed: only the dtype of the sum."""
    if accumulate is not None:
        return y_MH.to(accumulate)
    return y_MH.float() if in_fp32 else y_MH


def local_experts_forward(
    x_NH: Tensor, local_ids_NK: Tensor, weights_NK: Tensor, experts: ExpertWeights, glu: GLU,
    impl: str = "loop", weigh_in_fp32: bool = False, accumulate: torch.dtype | None = None,
    weigh_input: bool = False,
) -> tuple[Tensor, list[int]]:
    """Each received row's weighted sum over the slots whose expert is local.

    Returns ``(partial_NH, counts)``: ``[N, H]`` in ``x``'s dtype (or ``accumulate``),
    and the number of (row, slot) pairs each local expert computed. Weighting and the
    sum over a row's few slots run in the model's dtype (see ``sum_rows``), or in
    fp32 with ``weigh_in_fp32``, or in ``accumulate``. ``weigh_input``: the weights
    multiply the rows going in (:func:`weigh_rows`) and the outputs are summed as they
    come out (``MoEConfig.weigh_input``).
    """
    N, k = local_ids_NK.shape
    pair_M, counts = sort_by_local_expert(local_ids_NK, len(experts.w_down))  # (packed too)
    if impl == "auto_rows":
        impl = "loop" if sum(counts) >= LOOP_MIN_ROWS * len(counts) else "grouped_mm"
    if impl == "grouped_mm" and not grouped_mm_ok(experts):
        impl = "loop"
    rows_M = pair_M.div(k, rounding_mode="floor")
    w_M = weights_NK.reshape(-1).index_select(0, pair_M)
    x_MH = x_NH.index_select(0, rows_M)
    if weigh_input:
        y_MH = _unweighted(run_experts(weigh_rows(x_MH, w_M), counts, experts, glu, impl),
                           weigh_in_fp32, accumulate)
    else:
        y_MH = weigh(run_experts(x_MH, counts, experts, glu, impl), w_M, weigh_in_fp32,
                     accumulate)
    return sum_rows(y_MH, rows_M, pair_M % k, N, k).to(accumulate or x_NH.dtype), counts


def local_experts_forward_fixed(
    x_NH: Tensor, local_ids_NK: Tensor, weights_NK: Tensor, experts: ExpertWeights, glu: GLU,
    weigh_in_fp32: bool = False, weigh_input: bool = False,
) -> Tensor:
    """:func:`local_experts_forward` without a host sync: every one of the ``N * k``
    slots is gathered (absent ones sorted last and masked out), and the expert
    bounds stay on the device for ``grouped_mm``. Fixed shapes throughout, so
    it can be captured in a CUDA graph; needs :func:`grouped_mm_ok`. Costs the
    gather of the absent slots' rows (the grouped products skip them)."""
    N, k = local_ids_NK.shape
    e = experts.w_down.shape[0]
    ids = local_ids_NK.flatten()
    key = torch.where(ids >= 0, ids, e)  # [N*k]
    order = torch.argsort(key, stable=True)
    key_sorted = key.index_select(0, order)
    # Where each expert's rows end: how many sorted keys are <= it. No host read
    # (torch.bincount would read its input's min and max on the host on CUDA).
    offs = torch.searchsorted(key_sorted, torch.arange(e, device=key.device),
                              right=True).to(torch.int32)
    rows = order.div(k, rounding_mode="floor")
    valid = (key_sorted < e).unsqueeze(1)
    # Masked on the way in too: grouped_mm's backward leaves the gradient of rows
    # past the last offset undefined, and this keeps it out of x's gradient.
    x_in = torch.where(valid, x_NH.index_select(0, rows), 0.0)
    w = weights_NK.reshape(-1).index_select(0, order)
    if weigh_input:
        x_in = weigh_rows(x_in, w)
    y = grouped_experts(x_in, offs, key_sorted.clamp(max=e - 1), experts, glu, valid)
    y = _unweighted(y, weigh_in_fp32, None) if weigh_input else weigh(y, w, weigh_in_fp32)
    contrib = torch.where(valid, y, 0.0)  # past the last offset: junk
    return sum_rows(contrib, rows, order % k, N, k).to(x_NH.dtype)
