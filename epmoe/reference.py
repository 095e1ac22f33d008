"""The single-device reference: a plain per-expert loop that tests and the demo trust.

Written independently of the layer's router, dispatch and expert code, so that
comparing the two checks them. Shape legend: T tokens, H hidden, F
intermediate, E experts, k top_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MoEConfig
from .experts import init_expert, init_router

__all__ = ["full_weights", "reference_moe", "reference_tolerance"]


def full_weights(config: MoEConfig, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All weights of the layer on one device, as ``ExpertParallelMoE(config, ., seed=seed)``
    initialises them: ``router [E, H]``, ``w_gate [E, F, H]``, ``w_up [E, F, H]``,
    ``w_down [E, H, F]``, in ``config.dtype`` on the CPU."""
    experts = [init_expert(config, seed, e) for e in range(config.num_experts)]
    gate, up, down = (torch.stack(ws).to(config.dtype) for ws in zip(*experts, strict=True))
    return init_router(config, seed).to(config.dtype), gate, up, down


def reference_moe(
    x: Tensor,
    router_weight: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    config: MoEConfig,
) -> Tensor:
    """``y [T, H]`` for ``x [T, H]`` with all ``E`` experts on this device.

    Router logits in x's dtype; softmax or sigmoid, top-k and renormalisation
    in fp32; each expert's output is weighted and summed in fp32, and the sum
    is cast back to x's dtype.
    """
    logits = x @ router_weight.T  # [T, E]
    scores = logits.float().softmax(-1) if config.scoring == "softmax" else logits.float().sigmoid()
    topk_w, topk_ids = scores.topk(config.top_k, dim=-1)  # [T, k], [T, k]
    if config.renormalize:
        topk_w = topk_w / topk_w.sum(-1, keepdim=True)
    act = F.silu if config.activation == "silu" else F.gelu

    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(config.num_experts):
        tok, slot = torch.where(topk_ids == e)  # tokens that chose expert e, and in which slot
        if tok.numel() == 0:
            continue
        h = x[tok]
        out = (act(h @ w_gate[e].T) * (h @ w_up[e].T)) @ w_down[e].T
        y[tok] += topk_w[tok, slot, None] * out.float()  # a token picks e at most once
    return y.to(x.dtype)


def reference_tolerance(y_ref32: Tensor, y_ref_low: Tensor | None, dtype: torch.dtype) -> float:
    """How far an EP output may sit from the fp32 reference and still be right.

    fp32: 1e-5 of the output scale (max |y|). Lower precision: twice the error
    that the reference itself makes in that dtype (``y_ref_low``), plus one
    unit in the last place of the scale, since the EP layer rounds at
    different points (per rank partial sums) than the reference.
    """
    scale = float(y_ref32.abs().max()) if y_ref32.numel() else 0.0
    if dtype == torch.float32:
        return 1e-5 * max(scale, 1e-6)
    if y_ref_low is None:
        raise ValueError("reference_tolerance needs the low-precision reference for " + str(dtype))
    own = float((y_ref_low.float() - y_ref32).abs().max()) if y_ref32.numel() else 0.0
    return 2.0 * own + torch.finfo(dtype).eps * max(scale, 1e-6)
