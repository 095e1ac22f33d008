"""The local experts on oneDNN-prepacked weights (``epmoe.packed``): inference only.

Each path of :func:`epmoe.experts.run_experts` repeated on prepacked weights, so
that the bits stay those of the plain path (shape legend as in ``experts.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .ops import by_tiles

__all__ = ["PackedExperts", "packed_experts", "packed_linear"]

GLU = Callable[[Tensor, Tensor], Tensor]


class PackedExperts(NamedTuple):
    """The same experts with each weight prepacked for oneDNN (``epmoe.packed``): opaque
    tensors in a blocked layout, usable only by :func:`packed_linear`."""

    w_gate_up: tuple[Tensor, ...]  # e packed [2F, H]
    w_down: tuple[Tensor, ...]  # e packed [H, F]
    b_gate_up: Tensor | None  # [e, 2F], plain
    b_down: Tensor | None  # [e, H], plain
    grouped_ok: bool  # grouped_mm_ok() of the plain stacks: the path the plain layer takes


def packed_linear(x_MK: Tensor, w_packed_NK: Tensor, b_N: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)`` with ``w`` prepacked by ``torch.ops.mkldnn._reorder_linear_weight``
    -> ``[M, N]``. The same bits as ``F.linear`` in bf16 (and with a fused bias), measured
    here (``tests/test_packed.py``); not in fp32."""
    return torch.ops.mkldnn._linear_pointwise(x_MK, w_packed_NK, b_N, "none", [], "")


def packed_experts(x_MH: Tensor, counts: list[int], experts: PackedExperts, glu: GLU,
                   impl: str) -> Tensor:
    """:func:`run_experts` on prepacked weights, without autograd -> ``[M, H]``.

    Repeats the path ``impl`` names step for step: the same products (the packed
    product has ``F.linear``'s bits in bf16, its fused bias too) and the same
    element-wise steps on tensors of the same shapes, so the same bits. That matters
    where the paths differ: ``"grouped_mm"`` adds the biases after the products and
    runs the activation on all M rows at once, the loop fuses the biases and runs it
    per expert (vectorised sigmoid or silu can round a tensor's leftover tail
    differently), and GPT-OSS's logits differ in bf16 between the two.
    """
    Fi = experts.w_down[0].shape[1]
    w_gu, w_d, b_gu, b_d = experts.w_gate_up, experts.w_down, experts.b_gate_up, experts.b_down

    def mlp(x: Tensor, i: int) -> Tensor:  # expert_mlp: biases fused, a new activation
        gate, up = packed_linear(x, w_gu[i], None if b_gu is None else b_gu[i]).chunk(2, dim=1)
        return packed_linear(glu(gate, up), w_d[i], None if b_d is None else b_d[i])

    xs = x_MH.split(counts)  # (views, no copy)
    if impl == "invariant":  # invariant_experts
        return torch.cat([by_tiles(lambda t, i=i: mlp(t, i), x) for i, x in enumerate(xs)])
    if impl == "grouped_mm":  # grouped_experts: one product per expert instead of one group
        expert_M = None
        if b_gu is not None or b_d is not None:
            expert_M = torch.repeat_interleave(torch.arange(len(counts)),
                                               torch.tensor(counts)).to(x_MH.device)
        gu_M2F = torch.cat([packed_linear(x, w) for x, w in zip(xs, w_gu, strict=True)])
        if b_gu is not None:
            gu_M2F = gu_M2F + b_gu.index_select(0, expert_M)
        act_MF = glu(gu_M2F[:, :Fi], gu_M2F[:, Fi:])
        y_MH = torch.cat([packed_linear(a, w)
                          for a, w in zip(act_MF.split(counts), w_d, strict=True)])
        return y_MH if b_d is None else y_MH + b_d.index_select(0, expert_M)
    if b_d is None:  # the loop without autograd: the gate half overwritten in place
        act = getattr(glu, "in_place", glu)
        out_MH = x_MH.new_empty((x_MH.shape[0], w_d[0].shape[0]))
        start = 0
        for i, (x, n) in enumerate(zip(xs, counts, strict=True)):
            if n:  # (a copy of [n, H] where the plain loop writes with out=: same bits)
                gu = packed_linear(x, w_gu[i], None if b_gu is None else b_gu[i])
                out_MH[start : start + n] = packed_linear(act(gu[:, :Fi], gu[:, Fi:]), w_d[i])
            start += n
        return out_MH
    return torch.cat([mlp(x, i) for i, x in enumerate(xs)])  # the loop with biases
