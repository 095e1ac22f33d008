"""The local experts on quantized weights: dequantize an expert, run it, drop the copy.

Same contract as :func:`epmoe.experts.local_experts_forward` (rows received by
this rank, their local experts with -1 for the slots that live elsewhere, the
routing weights), but the weights are a :class:`~epmoe.quant.QuantizedExperts`
in the checkpoint's FP8 or MXFP4 format. Each local expert that received rows is
dequantized to the compute dtype and run as :func:`~epmoe.experts.expert_mlp`;
with the dequantized weights the result has the bits of the plain loop
(``impl="loop"``), checked in ``tests/test_quant.py``. Pure local code, no
collectives. Shape legend:

    N = token rows received by this rank     k = top_k slots per row
    M = (row, slot) pairs that name a local expert, sorted by local expert
    e = local experts    H = hidden size     F = intermediate size per expert
"""

from __future__ import annotations

import torch
from torch import Tensor

from .experts import (
    GLU,
    LOOP_MIN_ROWS,
    ExpertWeights,
    expert_mlp,
    grouped_mm_ok,
    run_experts,
    sort_by_local_expert,
    weigh,
)
from .ops import by_tiles, sum_rows
from .quant import QuantizedExperts

__all__ = ["quantized_experts_forward"]


def quantized_experts_forward(
    x_NH: Tensor, local_ids_NK: Tensor, weights_NK: Tensor, experts: QuantizedExperts,
    glu: GLU, weigh_in_fp32: bool = False, accumulate: torch.dtype | None = None,
    biases: tuple[Tensor, Tensor] | None = None, invariant: bool = False,
    impl: str = "loop",
) -> tuple[Tensor, list[int]]:
    """Each received row's weighted sum over the slots whose expert is local.

    ``x_NH`` in the compute dtype (the weights are dequantized to it), ``local_ids_NK``
    the local expert of each slot or -1, ``weights_NK`` the routing weights. ``biases``:
    ``(b_gate_up [e, 2F]`` (gate then up), ``b_down [e, H])`` in the compute dtype, for
    experts with biases (gpt-oss). ``invariant``: each expert on fixed tiles of rows
    (``MoEConfig.batch_invariant``, :func:`~epmoe.ops.by_tiles`).

    Returns ``(partial_NH, counts)`` as :func:`~epmoe.experts.local_experts_forward`.

    ``impl``: as the plain layer's (``"loop"``, ``"grouped_mm"``, ``"auto_rows"``), so
    that the products, hence the bits, are the plain path's on the dequantized weights.

    Cost: one dequantization per local expert that received rows, per forward (two
    new ``[2F, H]`` and ``[H, F]`` tensors); experts that received nothing are not
    dequantized. Nothing is cached: the loop holds one dequantized expert at a time;
    ``grouped_mm`` (chosen for few rows per expert) stacks those that received rows,
    for the duration of the products.
    """
    N, k = local_ids_NK.shape
    H = experts.hidden
    pair_M, counts = sort_by_local_expert(local_ids_NK, experts.num_local)
    rows_M = pair_M.div(k, rounding_mode="floor")
    x_MH = x_NH.index_select(0, rows_M)
    if impl == "auto_rows":  # (the plain layer's rule: experts.local_experts_forward)
        impl = "loop" if sum(counts) >= LOOP_MIN_ROWS * len(counts) else "grouped_mm"
    if impl == "grouped_mm" and not invariant:
        used = [i for i, n in enumerate(counts) if n]
        Fi = experts.inter
        w_gu = x_NH.new_empty((len(used), 2 * Fi, H))  # dequantized straight into the stack
        w_d = x_NH.new_empty((len(used), H, Fi))
        for j, i in enumerate(used):
            experts.expert(i, x_NH.dtype, out=(w_gu[j], w_d[j]))
        stack = ExpertWeights(w_gu, w_d, None if biases is None else biases[0][used],
                              None if biases is None else biases[1][used])
        if used and grouped_mm_ok(stack):
            y_MH = run_experts(x_MH, [counts[i] for i in used], stack, glu, "grouped_mm")
            y_MH = weigh(y_MH, weights_NK.reshape(-1).index_select(0, pair_M), weigh_in_fp32,
                         accumulate)
            return sum_rows(y_MH, rows_M, pair_M % k, N, k).to(accumulate or x_NH.dtype), \
                counts
    outs, start = [], 0
    for i, n in enumerate(counts):  # a plain loop over experts, not tokens
        if n:
            w_gu, w_d = experts.expert(i, x_NH.dtype)
            b = (None, None) if biases is None else (biases[0][i], biases[1][i])
            x = x_MH[start : start + n]
            if invariant:
                outs.append(by_tiles(lambda t, w_gu=w_gu, w_d=w_d, b=b:
                                     expert_mlp(t, w_gu, w_d, glu, *b), x))
            else:
                outs.append(expert_mlp(x, w_gu, w_d, glu, *b))
        start += n
    y_MH = torch.cat(outs) if outs else x_NH.new_empty((0, H))  # copy: one [M, H]
    y_MH = weigh(y_MH, weights_NK.reshape(-1).index_select(0, pair_M), weigh_in_fp32,
                 accumulate)
    return sum_rows(y_MH, rows_M, pair_M % k, N, k).to(accumulate or x_NH.dtype), counts
