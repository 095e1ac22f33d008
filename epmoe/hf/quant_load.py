"""Reading FP8 and MXFP4 checkpoints: dense weights dequantized at load, experts kept quantized.

The releases of DeepSeek-V3.x, Kimi K2, MiniMax-M2 and Qwen3-FP8 store every linear
weight in float8_e4m3fn with block scales (``x.weight`` and ``x.weight_scale_inv``);
gpt-oss stores its experts in MXFP4 (``experts.gate_up_proj_blocks`` / ``_scales``).
The replicated weights (attention, dense MLPs, shared experts) are dequantized
once, here, to the model's dtype, as transformers does on the CPU. Each rank's
routed experts stay as stored, in an :class:`~epmoe.quant.QuantizedExperts`, and
are dequantized one expert at a time when they compute
(:mod:`epmoe.experts_quant`): about half (FP8) or a quarter (MXFP4) of their bf16
bytes per rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..moe import ExpertParallelMoE
from ..quant import QuantFormat, QuantizedExperts, dequant_fp8_blocks, fp8_scale_name
from .checkpoint import CheckpointError, CheckpointReader

__all__ = ["keep_experts_quantized", "load_fp8_expert", "load_mxfp4_experts", "read_weight"]

FP8 = "F8_E4M3"


def read_weight(reader: CheckpointReader, name: str, shape: tuple[int, ...],
                fmt: QuantFormat | None, dtype: torch.dtype) -> Tensor:
    """The dense tensor ``name``, dequantized to ``dtype`` when the checkpoint stores it in
    FP8 (its ``weight_scale_inv`` beside it); other tensors as :meth:`CheckpointReader.read`."""
    if fmt is None or fmt.method != "fp8" or reader.dtype(name) != FP8:
        return reader.read(name, shape)
    scale = fp8_scale_name(name)
    if scale not in reader:
        raise CheckpointError(f"{reader.path}: the fp8 weight {name!r} has no {scale!r}")
    return dequant_fp8_blocks(reader.read(name, shape, quantized=True),
                              reader.read(scale, quantized=True), fmt.block, dtype)


def keep_experts_quantized(moe: ExpertParallelMoE, fmt: QuantFormat) -> None:
    """Give ``moe`` quantized experts of ``fmt`` in place of its plain stacks (to be
    filled by :func:`load_fp8_expert` or :func:`load_mxfp4_experts`)."""
    c = moe.config
    moe.use_quantized(QuantizedExperts.empty(fmt, len(moe.local_experts), c.hidden_size,
                                             c.intermediate_size, moe.state.device))


def load_fp8_expert(reader: CheckpointReader, moe: ExpertParallelMoE, i: int,
                    gate: str, up: str, down: str) -> None:
    """Local expert ``i`` of ``moe`` from its three FP8 weights (one tensor per expert, as
    DeepSeek releases them) and their block scales."""
    c = moe.config
    Fi, H = c.intermediate_size, c.hidden_size
    parts = {}
    for role, name, shape in (("gate", gate, (Fi, H)), ("up", up, (Fi, H)),
                              ("down", down, (H, Fi))):
        if reader.dtype(name) != FP8:
            raise CheckpointError(f"{reader.path}: expert weight {name!r} is "
                                  f"{reader.dtype(name)}, not fp8, in an fp8 checkpoint")
        parts[role] = (reader.read(name, shape, quantized=True),
                       reader.read(fp8_scale_name(name), quantized=True))
    try:
        moe.quantized.load_fp8(i, **parts)
    except ValueError as e:
        raise CheckpointError(f"{reader.path}: expert {moe.local_experts[i]} of {moe.name}: "
                              f"{e}") from None


def load_mxfp4_experts(reader: CheckpointReader, moe: ExpertParallelMoE, gate_up: str,
                       down: str, runs: list[tuple[int, int, int]]) -> None:
    """This rank's experts of ``moe`` from gpt-oss's stacked MXFP4 tensors (``gate_up``
    and ``down`` without their ``_blocks``/``_scales`` suffix), reading only the rows
    of its ``runs`` (first local index, first expert, end expert)."""
    c = moe.config
    E, H, Fi = c.num_experts, c.hidden_size, c.intermediate_size
    shapes = {f"{gate_up}_blocks": (E, 2 * Fi, H // 32, 16),
              f"{gate_up}_scales": (E, 2 * Fi, H // 32),
              f"{down}_blocks": (E, H, Fi // 32, 16), f"{down}_scales": (E, H, Fi // 32)}
    for name, shape in shapes.items():
        if name not in reader:
            raise CheckpointError(f"checkpoint {reader.path} has no tensor {name!r}")
        if reader.shape(name) != shape:
            raise CheckpointError(f"tensor {name!r} in {reader.path} has shape "
                                  f"{reader.shape(name)}, expected {shape}")
    for i, a, b in runs:
        got = {n: reader.read(n, s, rows=(a, b), quantized=True) for n, s in shapes.items()}
        for j in range(b - a):
            moe.quantized.load_mxfp4(
                i + j, gate_up=(got[f"{gate_up}_blocks"][j], got[f"{gate_up}_scales"][j]),
                down=(got[f"{down}_blocks"][j], got[f"{down}_scales"][j]))
