"""Tiny random checkpoints of every supported family, written by transformers' save_pretrained.

Used by the tests, and by ``scripts/make_tiny_checkpoint.py`` so that the
README's generate example runs without a download. A byte-level tokenizer
(256 byte tokens plus bos/eos/pad) is saved beside the model, so prompts can
be text.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_FAMILIES", "save_tiny_checkpoint", "tiny_config"]

VOCAB = 259  # 256 bytes, then <bos>=256, <eos>=257, <pad>=258
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=256,
              eos_token_id=257, pad_token_id=258, tie_word_embeddings=False,
              initializer_range=0.1)
# Per family: transformers' config class, and the fields that make it tiny but
# exercise its routing (groups, shared experts, dense first layers, biases).
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_local_experts=6,
                                      num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80, num_experts=6,
                                         num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=48,
                                         num_experts=6, num_experts_per_tok=2,
                                         norm_topk_prob=True, head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=48, num_experts=6, num_experts_per_tok=2,
                                  norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "deepseek_v2": ("DeepseekV2Config", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=1.5,
        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=48, num_local_experts=6,
                                     num_experts_per_tok=2, head_dim=16, swiglu_limit=1.0,
                                     sliding_window=8,
                                     rope_parameters={"rope_type": "default",
                                                      "rope_theta": 10000.0})),
}


def tiny_config(family: str, **overrides):
    """A small transformers config of ``family`` (see ``TINY_FAMILIES``)."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {sorted(TINY_FAMILIES)}, got {family!r}")
    cls_name, fields = TINY_FAMILIES[family]
    return getattr(transformers, cls_name)(**{**COMMON, **fields, **overrides})


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Byte-level BPE without merges: token i is byte i (shown as GPT-2's printable stand-in).
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def save_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0,
                         dtype: torch.dtype = torch.float32, tokenizer: bool = True,
                         max_shard_size: str | None = None, **overrides) -> Path:
    """Write a random tiny ``family`` model (and a byte tokenizer) to ``out_dir``.

    Random weights from ``seed``; biases and DeepSeek's score correction bias
    are drawn too (transformers initialises them to zero), so that every term
    of the routing is exercised. ``max_shard_size`` (e.g. ``"200KB"``) writes a
    sharded checkpoint with an index.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("bias", "e_score_correction_bias")) or "sinks" in name:
                t.normal_(0.0, 0.1)
    out = Path(out_dir)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    if tokenizer:
        _byte_tokenizer().save_pretrained(out)
    return out
