"""``save_pretrained``: an expert-parallel model written as a sharded Hugging Face checkpoint.

Every rank writes only what it owns: rank r of the EP group its routed experts
(``model-experts-000rr-of-000GG.safetensors``), rank 0 of the world also the
replicated weights (``model-dense.safetensors``: embeddings, attention, norms,
LM head, dense MLPs, routers, shared experts, DeepSeek-V3's score correction
bias). Rank 0 writes ``config.json`` and, last, ``model.safetensors.index.json``
naming every tensor's file: a directory without the index is an unfinished save.

The tensors carry Hugging Face's names, one tensor per expert
(``model.layers.{i}.mlp.experts.{e}.w1.weight`` for Mixtral, ``...gate_proj...``
for the others), the layout :func:`epmoe.hf.from_pretrained` reads, at any EP
size: a checkpoint saved on 2 ranks loads on 1, 3 or 4. With redundant experts an
expert is written once, by the rank holding its first copy. Families with expert
biases (GPT-OSS) are refused: their stacked biases have no per-expert names here.

All ranks of the world call it together and must see the same directory (one host,
or a shared file system across hosts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn

from ..collectives import gather_objects
from ..health import guarded
from ..moe import ExpertParallelMoE
from ..parallel_state import ParallelState, world_barrier
from .checkpoint import INDEX, CheckpointError
from .families import FAMILIES, family_of
from .loading import EPMoEBlock

__all__ = ["save_pretrained", "expert_file", "DENSE_FILE"]

DENSE_FILE = "model-dense.safetensors"


def expert_file(ep_rank: int, ep_size: int) -> str:
    return f"model-experts-{ep_rank + 1:05d}-of-{ep_size:05d}.safetensors"


def _blocks(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    return {name: m.moe for name, m in model.named_modules() if isinstance(m, EPMoEBlock)}


def dense_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The replicated tensors under Hugging Face's names (what rank 0 writes)."""
    family = family_of(model.config)
    blocks = _blocks(model)
    skip = tuple(f"{n}." for n in blocks)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) \
        if getattr(model.config, "tie_word_embeddings", False) else set()
    out = {n: t for n, t in model.state_dict().items()
           if not n.startswith(skip) and n not in tied}
    for prefix, moe in blocks.items():
        c, r = moe.config, f"{prefix}.{family.router}"
        out[f"{r}.weight"] = moe.router_weight
        if c.router_bias:
            out[f"{r}.bias"] = moe.router_bias
        if c.score_correction_bias:
            out[f"{r}.e_score_correction_bias"] = moe.score_correction_bias
        if c.shared_intermediate_size:
            s = f"{prefix}.{family.shared_prefix}"
            out[f"{s}.gate_proj.weight"] = moe.shared_gate
            out[f"{s}.up_proj.weight"] = moe.shared_up
            out[f"{s}.down_proj.weight"] = moe.shared_down
            if c.shared_expert_gate:
                out[f"{prefix}.shared_expert_gate.weight"] = moe.shared_expert_gate
    return out


def expert_tensors(model: nn.Module) -> dict[str, Tensor]:
    """This rank's routed experts under Hugging Face's names, each expert once over the
    group (by the rank holding its first copy)."""
    family = family_of(model.config)
    g, u, d = family.expert_keys
    out: dict[str, Tensor] = {}
    for prefix, moe in _blocks(model).items():
        if moe.config.expert_bias:
            raise ValueError(f"save_pretrained: {model.config.model_type} has expert biases, "
                             "which epmoe does not write per expert; supported: families "
                             "without them (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, "
                             "deepseek_v3)")
        if moe.tensor_parallel:
            raise ValueError("save_pretrained: a tensor-parallel layer holds slices of experts")
        m, rank = moe.expert_map, moe.state.ep_rank
        first = {slots[0] for slots in m.log2phy()}
        for row, p in enumerate(m.slots_on(rank)):
            if p not in first:
                continue  # a copy: its expert is written by the rank of its first slot
            x = f"{prefix}.experts.{m.phy2log[p]}"
            out[f"{x}.{g}.weight"] = moe.w_gate[row]
            out[f"{x}.{u}.weight"] = moe.w_up[row]
            out[f"{x}.{d}.weight"] = moe.w_down[row]
    return out


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}


def save_pretrained(model: nn.Module, out_dir: str | Path, state: ParallelState) -> Path:
    """Write ``model`` (from :func:`epmoe.hf.from_pretrained`) to ``out_dir`` as a sharded
    safetensors checkpoint, each rank its own experts (see the module docstring). A
    collective over the world. Returns the directory."""
    out = Path(out_dir)
    if any(type(m).__name__ == "SeamExperts" for m in model.modules()):
        raise CheckpointError(f"save_pretrained: model_type={model.config.model_type!r} runs "
                              "through transformers' experts seam, whose checkpoints epmoe does "
                              "not write yet; it writes the families with an adapter of its own: "
                              f"{sorted(FAMILIES)}")
    with torch.no_grad():
        mine = _plain(expert_tensors(model)) if state.dp_rank == 0 else {}
        dense = _plain(dense_tensors(model)) if state.rank == 0 else {}
    if state.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / INDEX).unlink(missing_ok=True)  # (unfinished until written again, last)
    world_barrier(state, "the start of save_pretrained")
    names: dict[str, str] = {}
    if mine:
        file = expert_file(state.ep_rank, state.ep_size)
        save_file(mine, out / file, metadata={"format": "pt"})
        names.update(dict.fromkeys(mine, file))
    if dense:
        save_file(dense, out / DENSE_FILE, metadata={"format": "pt"})
        names.update(dict.fromkeys(dense, DENSE_FILE))
    if state.world_size > 1:
        with guarded(state.heartbeat, "save_pretrained", tuple(range(state.world_size))):
            every = gather_objects(names, dist.group.WORLD)
    else:
        every = [names]
    if state.rank == 0:
        weight_map = {k: v for part in every for k, v in part.items()}
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        index = {"metadata": {"total_size": _total_size(out, set(weight_map.values())),
                              "saved_by": f"epmoe on {state.ep_size} EP rank(s)"},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    world_barrier(state, "the end of save_pretrained")
    return out


def _total_size(out: Path, files: set[str]) -> int:
    return sum((out / f).stat().st_size for f in files)

