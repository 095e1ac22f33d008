"""Tiny random checkpoints of the families that run through transformers' experts seam.

Each entry is transformers' config class and the fields that make the model
tiny while keeping what is special about its MoE: shared experts, groups,
dense first layers, hybrid (linear-attention or Mamba) layers, a multimodal
wrapper around the text model. :func:`save_tiny_seam_checkpoint` writes one
with transformers' ``save_pretrained``: the checkpoint layout is then the one
transformers writes for the family (its hub layout where it converts on load).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_SEAM_FAMILIES", "save_tiny_seam_checkpoint", "tiny_seam_config"]

TEXT = dict(vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=256, eos_token_id=257, pad_token_id=258, initializer_range=0.1)
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=16, head_dim=8, num_key_value_heads=4)
DEEPSEEK_MOE = dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                    num_experts_per_tok=3, n_group=2, topk_group=1, n_shared_experts=1,
                    routed_scaling_factor=2.5, norm_topk_prob=True)
DENSE_SPARSE = dict(first_k_dense_replace=1, mlp_layer_types=["dense", "sparse"])
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
LINEAR_ATTN = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                   linear_num_key_heads=2, linear_num_value_heads=4, head_dim=16,
                   layer_types=["linear_attention", "full_attention"])
QWEN_NEXT_MOE = dict(intermediate_size=96, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2)

# A tiny vision tower for the multimodal families (only their text part runs here).
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
              patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}

# family -> (config class, fields, where the text fields go: None = the config itself,
#            else the name of its text sub-config, beside a tiny vision_config)
TINY_SEAM_FAMILIES: dict[str, tuple[str, dict, str | None]] = {
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
        head_dim=16, rope_parameters=MROPE), "text_config"),
    "kimi_k25": ("Kimi_K25Config", dict(
        DEEPSEEK_MOE, **MLA, first_k_dense_replace=1, rope_parameters=ROPE,
        _vision=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                     num_attention_heads=2, patch_size=4, pos_emb_height=8, pos_emb_width=8),
        projection_hidden_size=32), "text_config"),
    "glm4v_moe": ("Glm4vMoeConfig", dict(
        DEEPSEEK_MOE, first_k_dense_replace=1, head_dim=16,
        rope_parameters=dict(MROPE, partial_rotary_factor=0.5, mrope_section=[2, 1, 1])),
        "text_config"),
    "glm4_moe": ("Glm4MoeConfig", dict(DEEPSEEK_MOE, first_k_dense_replace=1, head_dim=16),
                 None),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(DEEPSEEK_MOE, **MLA, **DENSE_SPARSE), None),
    "glm_moe_dsa": ("GlmMoeDsaConfig", dict(
        DEEPSEEK_MOE, **MLA, **DENSE_SPARSE, index_topk=4, index_head_dim=16, index_n_heads=2,
        layer_types=["indexed_attention"] * 2, indexer_types=["full"] * 2), None),
    "deepseek_v32": ("DeepseekV32Config", dict(
        DEEPSEEK_MOE, **MLA, **DENSE_SPARSE, index_topk=4, index_head_dim=16, index_n_heads=2,
        layer_types=["indexed_attention"] * 2), None),
    "minimax_m2": ("MiniMaxM2Config", dict(intermediate_size=32, num_local_experts=6,
                                           num_experts_per_tok=2, head_dim=16), None),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, moe_num_experts=6, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=1, head_dim=16), None),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=32, num_experts=6,
                                                  moe_topk=2, head_dim=16), None),
    "jamba": ("JambaConfig", dict(
        intermediate_size=32, num_experts=6, num_experts_per_tok=2, attn_layer_period=2,
        attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8), None),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=32, num_local_experts=6,
                                    num_experts_per_tok=2), None),
    "qwen3_next": ("Qwen3NextConfig", dict(QWEN_NEXT_MOE, **LINEAR_ATTN, norm_topk_prob=True),
                   None),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(QWEN_NEXT_MOE, **LINEAR_ATTN,
                                                architectures=["Qwen3_5MoeForCausalLM"]), None),
    "dots1": ("Dots1Config", dict(DEEPSEEK_MOE, head_dim=16, first_k_dense_replace=1,
                                  layer_types=["full_attention"] * 2), None),
    "exaone_moe": ("ExaoneMoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
        num_shared_experts=1, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], **DENSE_SPARSE), None),
    "mistral4": ("Mistral4Config", dict(DEEPSEEK_MOE, **dict(MLA, head_dim=16),
                                        first_k_dense_replace=0,
                                        architectures=["Mistral4ForCausalLM"]), None),
    "gemma4": ("Gemma4TextConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, num_experts=6, top_k_experts=2,
        enable_moe_block=True, head_dim=16, global_head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=259, architectures=["Gemma4ForCausalLM"]), None),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(
        intermediate_size=32, num_local_experts=6, num_experts_per_tok=2,
        shared_intermediate_size=48, layer_types=["mamba", "attention"], mamba_n_heads=4,
        mamba_d_head=32, mamba_d_state=8, mamba_chunk_size=16), None),
    "lfm2_moe": ("Lfm2MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
        num_dense_layers=1, layer_types=["conv", "full_attention"]), None),
}


# More families, from transformers' default config of the type made small by _shrink:
# their MoE needs nothing beyond the fields _shrink sets (experts, top-k, sizes).
SHRUNK_DEFAULTS = ("afmoe", "beam", "cohere2_moe", "granitemoe", "granitemoeshared",
                   "granitemoe_swa", "hy_v3", "kolibri1", "lara_mini", "mellum",
                   "mimo_v2_flash", "minimax", "solar_open")
TINY_SEAM_FAMILIES.update({t: ("auto", {}, None) for t in SHRUNK_DEFAULTS})


def _shrink(config):
    """``config`` (a default one) made tiny: 2 layers of hidden 64, 8 experts of F=32, top-2,
    the first layer dense where the family has dense layers first."""
    for k, v in {**TEXT, "head_dim": 16}.items():
        if hasattr(config, k) or k == "head_dim":
            setattr(config, k, v)
    for k, v in dict(intermediate_size=96, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48, expert_intermediate_size=32).items():
        if isinstance(getattr(config, k, None), int):
            setattr(config, k, v)
    for names, v in ((("num_experts", "num_local_experts", "n_routed_experts"), 8),
                     (("num_experts_per_tok", "moe_topk", "top_k"), 2), (("n_group",), 2),
                     (("topk_group",), 1)):
        for k in names:
            if isinstance(getattr(config, k, None), int) and \
                    not isinstance(getattr(config, k), bool):
                setattr(config, k, v)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        config.layer_types = (list(dict.fromkeys(layer_types))[:2] * 2)[:2]
    mlp_types = getattr(config, "mlp_layer_types", None)
    if isinstance(mlp_types, list) and mlp_types:  # (set past the config's own setter,
        config.__dict__["mlp_layer_types"] = (  # which checks it against the old depth)
            ["dense", "sparse"] if "dense" in mlp_types else mlp_types[-1:] * 2)
    for k in ("first_k_dense_replace", "num_dense_layers"):
        if isinstance(getattr(config, k, None), int):
            setattr(config, k, min(getattr(config, k), 1))
    config.num_hidden_layers = 2
    return config


def tiny_seam_config(family: str, **overrides):
    """A small transformers config of ``family`` (see ``TINY_SEAM_FAMILIES``)."""
    import transformers

    if family not in TINY_SEAM_FAMILIES:
        raise ValueError(f"family must be one of {sorted(TINY_SEAM_FAMILIES)}, got {family!r}")
    cls_name, fields, sub = TINY_SEAM_FAMILIES[family]
    if cls_name == "auto":
        config = _shrink(transformers.AutoConfig.for_model(family))
        for k, v in overrides.items():
            setattr(config, k, v)
        return config
    cls = getattr(transformers, cls_name)
    if sub is None:
        return cls(**{**TEXT, **fields, **overrides})
    text = {**TEXT, **fields, **overrides}
    vision = text.pop("_vision", VISION)
    top = {k: text.pop(k) for k in ("tie_word_embeddings", "projection_hidden_size")
           if k in text}
    return cls(**{sub: text, "vision_config": dict(vision)}, **top,
               architectures=[cls_name.replace("Config", "ForConditionalGeneration")])


def save_tiny_seam_checkpoint(family: str, out_dir: str | Path, seed: int = 0,
                              dtype: torch.dtype = torch.float32) -> Path:
    """Write a random tiny ``family`` model to ``out_dir`` with transformers' save_pretrained.
    Biases (expert score corrections among them) are drawn too: transformers starts them
    at zero, which would leave their part of the routing untested."""
    from .seam_load import model_class

    config = tiny_seam_config(family)
    torch.manual_seed(seed)
    model = model_class(config)._from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("bias") and t.is_floating_point():
                t.normal_(0.0, 0.1)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
