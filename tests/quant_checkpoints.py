"""Tiny quantized checkpoints in the published layouts, for the quantization tests.

Each writer starts from a tiny random bf16 model written by transformers'
``save_pretrained`` (``epmoe.hf.tiny``) and rewrites its safetensors file and
``config.json`` the way the official releases are laid out:

* FP8 block-scaled (DeepSeek-V3.x, Qwen3-FP8, Kimi K2, MiniMax-M2): every weight
  that transformers' FP8 quantizer converts (each ``nn.Linear`` but ``lm_head``,
  and every expert: attention projections, dense MLPs, shared and routed
  experts) becomes float8_e4m3fn ``[out, in]`` with an fp32 ``weight_scale_inv
  [ceil(out/b0), ceil(in/b1)]`` beside it; embeddings, norms, routers and
  ``lm_head`` stay as they were. ``quantization_config``: ``{"quant_method":
  "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size":
  [b0, b1]}``.
* MXFP4 (gpt-oss): only the experts. ``experts.gate_up_proj [E, H, 2F]`` (gate and
  up columns interleaved) is stored transposed, as ``gate_up_proj_blocks [E, 2F,
  H/32, 16]`` and ``gate_up_proj_scales [E, 2F, H/32]`` uint8; ``down_proj [E, F,
  H]`` as ``down_proj_blocks [E, H, F/32, 16]`` and ``down_proj_scales [E, H,
  F/32]``. Biases stay bf16.

:func:`dequantized_state` gives the weights a loader should end up with: each
quantized tensor dequantized with ``epmoe.quant`` (transformers' arithmetic).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from epmoe.hf.tiny import save_tiny_checkpoint
from epmoe.quant import (
    dequant_fp8_blocks,
    dequant_mxfp4,
    fp8_scale_name,
    quantize_fp8_blocks,
    quantize_mxfp4,
)

__all__ = ["FP8_SIZES", "dequantized_state", "save_fp8_checkpoint", "save_mxfp4_checkpoint"]

FILE = "model.safetensors"
# Tiny sizes whose every quantized dimension is a multiple of the block: transformers'
# CPU dequantization derives the block from the scale grid (rows // grid rows), so it
# refuses or misreads a partial last block (see tests/test_quant.py).
FP8_SIZES: dict[tuple[str, int], dict] = {
    ("deepseek_v3", 8): dict(),  # (kv_a_proj_with_mqa's 16 + 8 rows: blocks of 8, not 16)
    ("qwen3_moe", 16): dict(),
    ("qwen3_moe", 128): dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256,
                             num_key_value_heads=4, head_dim=32, num_hidden_layers=2),
}
# Weights transformers' FP8 quantizer leaves alone (not an nn.Linear, or lm_head).
_FP8_KEEP = re.compile(r"(embed_tokens|norm|lm_head|mlp\.gate\.weight|\.router\.)")


def _fp8_quantized(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.ndim == 2 and not _FP8_KEEP.search(name)


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], qconfig: dict) -> Path:
    save_file(tensors, str(path / FILE), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def save_fp8_checkpoint(family: str, out_dir: str | Path, block: tuple[int, int] = (16, 16),
                        seed: int = 0, **overrides) -> Path:
    """A tiny ``family`` model (``"deepseek_v3"``, ``"qwen3_moe"``) in DeepSeek's FP8 layout,
    blocks of ``block``; sizes from :data:`FP8_SIZES` unless overridden."""
    sizes = {**FP8_SIZES.get((family, block[0]), {}), **overrides}
    path = save_tiny_checkpoint(family, out_dir, seed=seed, dtype=torch.bfloat16,
                                tokenizer=False, **sizes)
    out: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(path / FILE)).items():
        if _fp8_quantized(name, t):
            out[name], out[fp8_scale_name(name)] = quantize_fp8_blocks(t, block)
        else:
            out[name] = t
    return _rewrite(path, out, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                "fmt": "e4m3", "weight_block_size": list(block)})


def save_mxfp4_checkpoint(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny gpt-oss model with MXFP4 experts, as gpt-oss is released (H and F
    multiples of 32: ``intermediate_size`` 64 unless overridden)."""
    path = save_tiny_checkpoint("gpt_oss", out_dir, seed=seed, dtype=torch.bfloat16,
                                tokenizer=False, **{"intermediate_size": 64, **overrides})
    out: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(path / FILE)).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # [E, H, 2F] / [E, F, H] (x @ W) -> rows = output features, as stored
            out[f"{name}_blocks"], out[f"{name}_scales"] = quantize_mxfp4(t.transpose(1, 2))
        else:
            out[name] = t
    return _rewrite(path, out, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]})


def dequantized_state(path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint at ``path`` with every quantized tensor dequantized to ``dtype`` and
    named as in the unquantized model (gpt-oss's experts back to ``[E, H, 2F]`` and
    ``[E, F, H]``); other tensors as stored."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    raw = load_file(str(path / FILE))
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith(("_scale_inv", "_scales")):
            continue
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            out[base] = dequant_mxfp4(t, raw[f"{base}_scales"], dtype).transpose(1, 2)
        elif t.dtype == torch.float8_e4m3fn:
            out[name] = dequant_fp8_blocks(t, raw[fp8_scale_name(name)],
                                           tuple(cfg["weight_block_size"]), dtype)
        else:
            out[name] = t
    return out
