"""The supported Hugging Face MoE families: which block to replace, its routing, its tensors.

Every routing behaviour is read from a named field of the model's config
(``norm_topk_prob``, ``n_group``, ...), never guessed from sizes, and follows
the family's modeling file in transformers 5:

=============  ==========================================================================
family         router (``epmoe.MoEConfig`` fields)
=============  ==========================================================================
mixtral        softmax, top-k, always renormalised
qwen3_moe      softmax, top-k, renormalised when ``norm_topk_prob``
olmoe          softmax, top-k, renormalised when ``norm_topk_prob``
qwen2_moe      as qwen3_moe, plus a shared expert scaled by ``sigmoid(shared_expert_gate)``
deepseek_v3    fp32 sigmoid; ``e_score_correction_bias`` to choose only; top-``topk_group``
               of ``n_group`` groups by their top-2 sum; renormalised when ``norm_topk_prob``;
               times ``routed_scaling_factor``; ``n_shared_experts`` shared experts; the first
               ``first_k_dense_replace`` layers dense
deepseek_v2    fp32 softmax; ``topk_method`` greedy or group_limited_greedy (groups by their
               max); no renormalisation (as transformers); times ``routed_scaling_factor``
gpt_oss        router bias; softmax over the top-k logits (= softmax, top-k, renormalise);
               expert biases; clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``) on
               interleaved gate/up columns
=============  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .checkpoint import CheckpointError

__all__ = ["FAMILIES", "Family", "family_of"]


@dataclass(frozen=True)
class Family:
    """How one model family lays out its MoE blocks in the model and the checkpoint."""

    model_type: str  # config.json's "model_type"
    block_class: str  # transformers' class of the MoE block that epmoe replaces
    prefixes: tuple[str, ...]  # the block's name under model.layers.{i}, in checkpoints
    router: str  # the router's module name in the block ("gate" or "router")
    expert_keys: tuple[str, str, str]  # per-expert gate, up, down names (experts.{e}.<name>)
    fused_layout: str  # a stacked experts.gate_up_proj: "concat" [E, 2F, H] (gate rows,
    #                    then up rows; transformers 5) or "interleaved_t" [E, H, 2F] (GPT-OSS)
    shared_prefix: str | None  # the shared expert's module name in the block, if any
    returns_router_scores: bool  # the block returns (hidden, scores) rather than hidden
    moe_fields: Callable[[object], dict]  # MoEConfig fields from the Hugging Face config


def _act(cfg) -> str:
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "gelu"):
        raise CheckpointError(f"{cfg.model_type}: hidden_act={act!r} is not supported by epmoe's "
                              "experts (supported: 'silu', 'gelu')")
    return act


def _softmax_family(experts_attr: str, ffn_attr: str, renorm: Callable[[object], bool],
                    shared: bool = False, fp32_weights: bool = False) -> Callable[[object], dict]:
    def fields(cfg) -> dict:
        out = dict(num_experts=getattr(cfg, experts_attr),
                   intermediate_size=getattr(cfg, ffn_attr), renormalize=renorm(cfg),
                   activation=_act(cfg), weigh_in_fp32=fp32_weights)
        if shared:
            out.update(shared_intermediate_size=cfg.shared_expert_intermediate_size,
                       shared_expert_gate=True)
        return out
    return fields


def _deepseek_v3(cfg) -> dict:
    return dict(num_experts=cfg.n_routed_experts, intermediate_size=cfg.moe_intermediate_size,
                scoring="sigmoid", renormalize=bool(cfg.norm_topk_prob), router_fp32=True,
                score_correction_bias=True, n_group=cfg.n_group or 1,
                topk_group=cfg.topk_group or 1, group_scoring="top2_sum",
                routed_scaling_factor=float(cfg.routed_scaling_factor), activation=_act(cfg),
                weigh_in_fp32=True,
                shared_intermediate_size=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0))


def _deepseek_v2(cfg) -> dict:
    if getattr(cfg, "mlp_bias", False):
        raise CheckpointError("deepseek_v2 with mlp_bias=True is not supported (shared expert "
                              "biases)")
    method = cfg.topk_method or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise CheckpointError(f"deepseek_v2: topk_method={method!r} is not supported (supported: "
                              "'greedy', 'group_limited_greedy')")
    grouped = method == "group_limited_greedy"
    return dict(num_experts=cfg.n_routed_experts, intermediate_size=cfg.moe_intermediate_size,
                scoring="softmax", renormalize=False, router_fp32=True,
                n_group=cfg.n_group if grouped else 1, topk_group=cfg.topk_group if grouped else 1,
                group_scoring="max", routed_scaling_factor=float(cfg.routed_scaling_factor),
                activation=_act(cfg), weigh_in_fp32=True,
                shared_intermediate_size=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0))


def _gpt_oss(cfg) -> dict:
    return dict(num_experts=cfg.num_local_experts, intermediate_size=cfg.intermediate_size,
                renormalize=True, router_bias=True, expert_bias=True,
                activation="clamped_swiglu", swiglu_alpha=float(cfg.swiglu_alpha),
                swiglu_limit=float(cfg.swiglu_limit))


PROJ = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("mixtral", "MixtralSparseMoeBlock", ("block_sparse_moe", "mlp"), "gate",
           ("w1", "w3", "w2"), "concat", None, False,
           _softmax_family("num_local_experts", "intermediate_size", lambda c: True,
                           fp32_weights=True)),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", ("mlp",), "gate", PROJ, "concat", None, False,
           _softmax_family("num_experts", "moe_intermediate_size",
                           lambda c: bool(c.norm_topk_prob))),
    Family("olmoe", "OlmoeSparseMoeBlock", ("mlp",), "gate", PROJ, "concat", None, False,
           _softmax_family("num_experts", "intermediate_size", lambda c: bool(c.norm_topk_prob))),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", ("mlp",), "gate", PROJ, "concat",
           "shared_expert", False,
           _softmax_family("num_experts", "moe_intermediate_size",
                           lambda c: bool(c.norm_topk_prob), shared=True)),
    Family("deepseek_v3", "DeepseekV3MoE", ("mlp",), "gate", PROJ, "concat", "shared_experts",
           False, _deepseek_v3),
    Family("deepseek_v2", "DeepseekV2Moe", ("mlp",), "gate", PROJ, "concat", "shared_experts",
           False, _deepseek_v2),
    Family("gpt_oss", "GptOssMLP", ("mlp",), "router", PROJ, "interleaved_t", None, True,
           _gpt_oss),
]}


def family_of(hf_config) -> Family:
    """The family of a Hugging Face config, or a clear error naming the supported ones."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type={model_type!r} is not a supported MoE family; "
                              f"supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]
