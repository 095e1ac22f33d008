"""The single-device reference: a plain per-expert loop that tests and the demo trust.

Written independently of the layer's router, dispatch and expert code, so that
comparing the two checks them. Shape legend: T tokens, H hidden, F
intermediate, E experts, k top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MoEConfig
from .experts import init_expert, init_router

__all__ = ["Comparison", "compare_to_reference", "full_weights", "reference_moe"]


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


@dataclass(frozen=True)
class Comparison:
    """An output checked against the fp32 reference, token by token."""

    max_error: float  # max |y - y_ref| over all elements, y_ref in fp32
    tolerance: float  # the allowance of the token where the error is largest
    worst_ratio: float  # max over tokens of error / allowance (ok when <= 1)
    ok: bool

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return (f"max abs error {self.max_error:.3g} (allowed there {self.tolerance:.3g}; "
                f"worst token at {self.worst_ratio:.2f} of its allowance) -> {verdict}")


def compare_to_reference(
    y: Tensor, x: Tensor, router_weight: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
    config: MoEConfig, splits: list[int] | None = None,
) -> Comparison:
    """Check a layer's output ``y [T, H]`` for ``x [T, H]`` against :func:`reference_moe`.

    ``splits``: when ``x`` is several ranks' tokens concatenated, the rows of
    each rank; the reference then runs per block, as each rank routed its own
    batch. (A matrix product's last bits depend on its batch, and a near-tie
    in the router could otherwise pick a different expert here than there.)

    fp32: every token within 1e-5 of the output scale (max |y_ref|). Lower
    precision: the reference runs in fp32 on the same (rounded) inputs and
    weights, and once in ``config.dtype``; each token may be off by twice what
    the low-precision reference is off on that token, plus one unit in the last
    place of the scale. (A token whose top-k flips under rounding is off by a
    lot in both; every other token must stay close.)
    """
    weights = (router_weight, w_gate, w_up, w_down)
    blocks = list(x.split(splits if splits is not None else [x.shape[0]]))

    def ref_in(dtype: torch.dtype) -> Tensor:
        c = config.replace(dtype=dtype)
        outs = [reference_moe(b.to(dtype), *(w.to(dtype) for w in weights), c) for b in blocks]
        return torch.cat(outs).float() if outs else x.new_zeros(x.shape, dtype=torch.float32)

    ref = ref_in(torch.float32)
    err_T = (y.float() - ref).abs().amax(dim=1) if y.numel() else ref.new_zeros(y.shape[0])
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-6)
    if config.dtype == torch.float32:
        tol_T = torch.full_like(err_T, 1e-5 * scale)
    else:
        low = ref_in(config.dtype)
        own_T = (low - ref).abs().amax(dim=1) if low.numel() else torch.zeros_like(err_T)
        tol_T = 2.0 * own_T + torch.finfo(config.dtype).eps * scale
    if err_T.numel() == 0:
        return Comparison(0.0, float(tol_T.max()) if tol_T.numel() else 0.0, 0.0, True)
    worst = int(err_T.argmax())
    ratio = float((err_T / tol_T).max())
    return Comparison(float(err_T[worst]), float(tol_T[worst]), ratio, ratio <= 1.0)
