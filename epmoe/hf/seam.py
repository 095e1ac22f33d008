"""transformers' experts seam: any MoE model whose experts go through it, expert-parallel.

transformers 5 runs the routed experts of nearly every MoE family through one
interface (``transformers/integrations/moe.py``): an experts module decorated
with ``@use_experts_implementation``, holding ``gate_up_proj [E, 2F, H]`` and
``down_proj [E, H, F]`` and called by the family's own block as
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
Here each such module becomes a :class:`SeamExperts`, an
:class:`~epmoe.moe.ExpertParallelMoE` with ``router="given"``: the family's
router, shared experts, norms and everything else run as transformers wrote them
(replicated, local), and only the (token, expert) pairs travel: to the ranks
that hold their experts, through the layer's dispatch, and back. Routing equals
transformers' by construction.

What a family's experts need beyond the common case is read from the module
(the decorator's flags), never from the family's name:

* the gated product: SwiGLU and gated exact GELU run epmoe's own kernels; any
  other activation (``act_fn``) or a family's own ``_apply_gate`` (GPT-OSS-style
  clamps, soft caps) is called as transformers defines it (``activation="custom"``);
* ``is_transposed`` (``[E, H, 2F]`` in memory): the loader transposes each
  expert as it reads it;
* refused by name, with what is missing: experts without a gate (``has_gate=False``,
  e.g. relu² experts), a norm after each expert (``has_post_expert_norm``), and
  biases in the generic path (GPT-OSS has its own adapter, :mod:`epmoe.hf.families`).

Shape legend as in :mod:`epmoe.moe`: T tokens on this rank, H hidden, F expert
intermediate, E experts, k chosen per token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import GLU
from ..moe import ExpertParallelMoE
from ..parallel_state import ParallelState
from .checkpoint import CheckpointError

__all__ = ["SeamExperts", "experts_modules", "seam_layer", "top_k_of"]

# Config fields that name the experts chosen per token, in the families of transformers 5.24.
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k", "num_experts_per_token",
                "top_k_experts")


class SeamExperts(nn.Module):
    """Stands in for a transformers experts module: ``(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, through ``self.moe`` (this rank's experts)."""

    def __init__(self, moe: ExpertParallelMoE, hf_class: str) -> None:
        super().__init__()
        self.moe = moe
        self.hf_class = hf_class  # the transformers class it replaced, for repr and errors
        self.num_experts = moe.config.num_experts  # (some blocks read it)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, shape[-1])
        k = top_k_index.shape[-1]
        # The weights travel in fp32 (exact for bf16 and fp16 weights), as epmoe's router's.
        routing = (top_k_weights.reshape(-1, k).float(), top_k_index.reshape(-1, k))
        return self.moe(x_TH, routing=routing).reshape(shape)

    def extra_repr(self) -> str:
        return f"replaces={self.hf_class}"


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every experts module of ``model`` that goes through
    transformers' seam (its class was decorated by ``@use_experts_implementation``,
    which sets these flags on every instance), in the model's order."""
    flags = ("has_gate", "is_transposed", "is_concatenated", "has_bias")
    return [(n, m) for n, m in model.named_modules()
            if all(hasattr(m, f) for f in flags) and hasattr(m, "down_proj")]


def top_k_of(hf_config) -> int:
    """Experts chosen per token, from the config field the family names it by."""
    for name in TOP_K_FIELDS:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise CheckpointError(f"{hf_config.model_type}: no experts-per-token field in its config "
                          f"(looked for {list(TOP_K_FIELDS)})")


def _shapes(module: nn.Module) -> tuple[int, int, int]:
    """``(E, H, F)`` from the module's (meta) weights, whichever way they are laid out."""
    gate_up, down = module.gate_up_proj, module.down_proj
    if module.is_transposed:  # [E, H, 2F] and [E, F, H]
        return gate_up.shape[0], gate_up.shape[1], down.shape[1]
    return gate_up.shape[0], gate_up.shape[2], down.shape[2]  # [E, 2F, H], [E, H, F]


def _glu(module: nn.Module) -> tuple[str, GLU | None]:
    """The ``MoEConfig.activation`` for the module's gated product, and the function
    when it is the module's own (``"custom"``)."""
    from transformers.integrations.moe import _default_apply_gate

    own_gate = type(module)._apply_gate is not _default_apply_gate
    if not own_gate:
        act = getattr(module, "act_fn", None)
        kind = type(act).__name__
        if kind in ("SiLU", "SiLUActivation"):
            return "silu", None
        if kind == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu:
            return "gelu", None
        if act is None:
            raise CheckpointError(f"{type(module).__name__}: no act_fn and no _apply_gate: "
                                  "cannot tell its gated product")
        return "custom", lambda g, u: act(g) * u
    apply_gate = module._apply_gate  # (the module's own: bound, reads its constants)
    if module.is_concatenated:  # expects [gate | up] along the last dimension
        return "custom", lambda g, u: apply_gate(torch.cat([g, u], dim=-1))
    return "custom", lambda g, u: apply_gate(torch.stack([g, u], dim=-1).flatten(-2))


def seam_layer(module: nn.Module, hf_config, state: ParallelState, dtype: torch.dtype,
               options: dict, name: str, collect_stats: bool = False) -> SeamExperts:
    """The :class:`SeamExperts` that replaces transformers' experts ``module``; its
    weights are left to load. ``options``: further :class:`MoEConfig` fields."""
    cls = type(module).__name__
    missing = [what for flag, what in (
        (not module.has_gate, "experts without a gate (has_gate=False)"),
        (module.has_post_expert_norm if hasattr(module, "has_post_expert_norm") else False,
         "a norm after each expert (has_post_expert_norm=True)"),
        (module.has_bias, "expert biases (has_bias=True)")) if flag]
    if missing:
        raise CheckpointError(f"{hf_config.model_type}: its experts ({cls}) have "
                              f"{' and '.join(missing)}, which epmoe's experts do not run; "
                              "supported: gated experts without biases or per-expert norms")
    E, H, Fi = _shapes(module)
    activation, glu = _glu(module)
    config = MoEConfig(hidden_size=H, intermediate_size=Fi, num_experts=E,
                       top_k=top_k_of(hf_config), dtype=dtype, router="given",
                       activation=activation, weigh_in_fp32=True).replace(**options)
    moe = ExpertParallelMoE(config, state, seed=None, collect_stats=collect_stats, name=name,
                            glu=glu)
    return SeamExperts(moe, cls)
