"""Filling a transformers model built on the meta device from a checkpoint: the pieces every
loader shares (epmoe's adapters in :mod:`.loading`, the experts seam in :mod:`.seam_load`,
Llama 4 in :mod:`.llama4`).

Shape legend: E experts, their global ids; a run is (first local index, start id, stop id).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, CheckpointReader

__all__ = ["check_nothing_on_meta", "check_shape", "fp32_patterns", "rebuild_meta_buffers",
           "runs", "set_tensor"]


def set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = owner._parameters.get(leaf)
    if old is not None:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


def rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Modules whose buffers are computed at init (rotary embeddings) are rebuilt from their
    config on the real device: their buffers are not in the checkpoint."""
    for name, module in list(model.named_modules()):
        computed = [b for n, b in module.named_buffers(recurse=False)
                    if b.is_meta and n in module._non_persistent_buffers_set]
        if not computed:
            continue  # persistent buffers: loaded from the checkpoint with the weights
        config = getattr(module, "config", None)
        if config is not None and not any(p.is_meta for p in module.parameters(recurse=False)):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, type(module)(config).to(device))
        else:  # (Gemma's scaled embedding): transformers' own init computes them; the
            # module's weights get allocated and initialised too, then loaded over
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)


def fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[re.Pattern]:
    """The weights transformers keeps in fp32 at this dtype (``_keep_in_fp32_modules``,
    for float16, and ``_keep_in_fp32_modules_strict``, for float16 and bfloat16), as
    transformers matches them: a search of the glob in the weight's name."""
    names = list(getattr(model, "_keep_in_fp32_modules", None) or []) \
        if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return [re.compile(re.escape(n).replace(r"\*", ".*")) for n in names]


def runs(ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Contiguous runs of global ids as (first local index, start id, stop id)."""
    runs: list[tuple[int, int, int]] = []
    for i, g in enumerate(ids):
        if runs and runs[-1][2] == g:
            runs[-1] = (runs[-1][0], runs[-1][1], g + 1)
        else:
            runs.append((i, g, g + 1))
    return runs


def check_shape(reader: CheckpointReader, name: str, shape: tuple[int, ...]) -> None:
    if name not in reader:
        raise CheckpointError(f"checkpoint {reader.path} has no tensor {name!r}")
    if reader.shape(name) != shape:
        raise CheckpointError(f"tensor {name!r} in {reader.path} has shape {reader.shape(name)}, "
                              f"expected {shape}")


def check_nothing_on_meta(model: nn.Module, path: Path) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: these tensors were not loaded: {left[:10]}"
                              + (f" and {len(left) - 10} more" if len(left) > 10 else ""))
