"""The single-device reference: a plain per-expert loop that tests and the demo trust.

Written independently of the layer's dispatch and expert code, so that
comparing the two checks them (routing reuses :func:`epmoe.route`, which has
its own hand-worked tests). Shape legend: T tokens, H hidden, F intermediate,
Fs shared intermediate, E experts, k top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .capacity import capacity_keep, expert_capacity
from .config import MoEConfig
from .experts import gated_activation, init_expert, init_router, init_shared
from .router import route

__all__ = [
    "Comparison", "compare_to_reference", "full_optional_weights", "full_weights",
    "reference_moe",
]


def full_weights(config: MoEConfig, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All routed weights on one device, as ``ExpertParallelMoE(config, ., seed=seed)``
    initialises them: ``router [E, H]``, ``w_gate [E, F, H]``, ``w_up [E, F, H]``,
    ``w_down [E, H, F]``, on the CPU (router in ``config.router_dtype``, the rest
    in ``config.dtype``). See :func:`full_optional_weights` for the others."""
    experts = [init_expert(config, seed, e) for e in range(config.num_experts)]
    gate, up, down = (torch.stack([w[n] for w in experts]).to(config.dtype)
                      for n in ("w_gate", "w_up", "w_down"))
    return init_router(config, seed)["router_weight"].to(config.router_dtype), gate, up, down


def full_optional_weights(config: MoEConfig, seed: int = 0) -> dict[str, Tensor]:
    """The weights a config adds (biases, shared expert), full size, by keyword name."""
    out = {n: t for n, t in init_router(config, seed).items() if n != "router_weight"}
    if config.expert_bias:
        experts = [init_expert(config, seed, e) for e in range(config.num_experts)]
        for name in ("b_gate", "b_up", "b_down"):
            out[name] = torch.stack([w[name] for w in experts])
    out.update(init_shared(config, seed))
    return {n: t.to(torch.float32 if n == "score_correction_bias" else
                    config.router_dtype if n == "router_bias" else config.dtype)
            for n, t in out.items()}


def reference_moe(
    x: Tensor,
    router_weight: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    config: MoEConfig,
    expert_input: Tensor | None = None,
    **optional: Tensor,
) -> Tensor:
    """``y [T, H]`` for ``x [T, H]`` with all ``E`` experts on this device.

    ``expert_input``: the tokens as the experts see them, when they differ from
    what the router sees (low-precision dispatch); default ``x``.

    ``optional``: the config's extra weights by name (``router_bias``,
    ``score_correction_bias``, ``b_gate``, ``b_up``, ``b_down``, ``shared_gate``,
    ``shared_up``, ``shared_down``, ``shared_expert_gate``). Each expert's output
    is weighted and summed in fp32, and the sum is cast back to x's dtype; the
    shared expert is added after, in x's dtype. With ``config.capacity_factor``, ``x``
    is taken as one rank's tokens of one dispatch round (:mod:`epmoe.capacity`).
    """
    topk_w, topk_ids = route(x, router_weight, config, optional.get("router_bias"),
                             optional.get("score_correction_bias"))  # [T, k], [T, k]
    if config.capacity_factor:  # x is one rank's tokens: its pairs over capacity are dropped
        keep = capacity_keep(topk_w, topk_ids, config.num_experts, expert_capacity(
            x.shape[0], config.top_k, config.num_experts, config.capacity_factor),
            config.drop_policy)
        topk_ids = torch.where(keep, topk_ids, -1)
    glu = gated_activation(config)
    b_gate, b_up, b_down = (optional.get(n) for n in ("b_gate", "b_up", "b_down"))

    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(config.num_experts):
        tok, slot = torch.where(topk_ids == e)  # tokens that chose expert e, and in which slot
        if tok.numel() == 0:
            continue
        h = (x if expert_input is None else expert_input)[tok]
        g = F.linear(h, w_gate[e], None if b_gate is None else b_gate[e])
        u = F.linear(h, w_up[e], None if b_up is None else b_up[e])
        out = F.linear(glu(g, u), w_down[e], None if b_down is None else b_down[e])
        y[tok] += topk_w[tok, slot, None] * out.float()  # a token picks e at most once
    y = y.to(x.dtype)
    if config.shared_intermediate_size:
        s = F.linear(glu(F.linear(x, optional["shared_gate"]), F.linear(x, optional["shared_up"])),
                     optional["shared_down"])
        if config.shared_expert_gate:
            s = torch.sigmoid(F.linear(x, optional["shared_expert_gate"])) * s
        y = y + s
    return y


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
    config: MoEConfig, splits: list[int] | None = None, **optional: Tensor,
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
    weights = {"router_weight": router_weight, "w_gate": w_gate, "w_up": w_up,
               "w_down": w_down, **optional}
    blocks = list(x.split(splits if splits is not None else [x.shape[0]]))

    def ref_in(dtype: torch.dtype) -> Tensor:
        c = config.replace(dtype=dtype)
        ws = {n: t if n == "score_correction_bias" else t.to(dtype) for n, t in weights.items()}
        if config.router_fp32:  # the router stays fp32 in both
            ws = {n: weights[n] if n in ("router_weight", "router_bias") else t
                  for n, t in ws.items()}
        outs = [reference_moe(b.to(dtype), config=c, **ws) for b in blocks]
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
