"""``from_pretrained``: a Hugging Face MoE checkpoint served expert-parallel.

The model is transformers' own class, built on the meta device (no weight is
allocated), with every MoE block replaced by :class:`EPMoEBlock`. Then each
rank reads from the safetensors files only what it keeps: the dense weights
(replicated: embeddings, attention, norms, LM head, dense MLPs, routers and
shared experts) and its own routed experts, one expert (or one contiguous run
of experts) at a time.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..collectives import gather_objects
from ..config import MoEConfig, parse_dtype
from ..health import guarded
from ..moe import ExpertParallelMoE
from ..parallel_state import ParallelState
from ..quant import quant_format_of
from .checkpoint import CheckpointError, CheckpointReader
from .families import FAMILIES, Family, family_of
from .fill import (
    check_nothing_on_meta,
    check_shape,
    fp32_patterns,
    rebuild_meta_buffers,
    runs,
    set_tensor,
)
from .llama4 import LLAMA4_TYPES, build_llama4_model
from .lockstep import Lockstep
from .quant_load import keep_experts_quantized, load_fp8_expert, load_mxfp4_experts, read_weight
from .seam_load import build_seam_model

__all__ = ["EPMoEBlock", "from_pretrained", "moe_config_of"]


class EPMoEBlock(nn.Module):
    """Stands in for a transformers MoE block: ``[B, S, H] -> [B, S, H]`` through ``self.moe``."""

    def __init__(self, moe: ExpertParallelMoE, returns_router_scores: bool) -> None:
        super().__init__()
        self.moe = moe
        self.returns_router_scores = returns_router_scores  # GPT-OSS: (hidden, scores)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        shape = hidden_states.shape
        y = self.moe(hidden_states.reshape(-1, shape[-1])).reshape(shape)
        return (y, None) if self.returns_router_scores else y


def moe_config_of(hf_config, dtype: torch.dtype, placement: str = "linear",
                  overlap_shared: bool = True) -> MoEConfig:
    """The :class:`MoEConfig` of one MoE block of a Hugging Face config."""
    family = family_of(hf_config)
    return MoEConfig(hidden_size=hf_config.hidden_size, top_k=hf_config.num_experts_per_tok,
                     dtype=dtype, placement=placement, overlap_shared=overlap_shared,
                     **family.moe_fields(hf_config))


def _config_dtype(hf_config) -> torch.dtype:
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return parse_dtype(value) if value is not None else torch.float32


def from_pretrained(
    path: str | Path,
    state: ParallelState,
    dtype: torch.dtype | str | None = None,
    placement: str = "linear",
    overlap_shared: bool = True,
    collect_stats: bool = False,
    moe_options: dict | None = None,
):
    """Load a Hugging Face MoE model directory, expert-parallel over ``state``'s EP group.

    ``path`` holds ``config.json`` and ``model.safetensors`` (or shards with
    ``model.safetensors.index.json``). ``dtype`` defaults to the config's.
    Returns transformers' ``...ForCausalLM`` whose MoE blocks are
    :class:`EPMoEBlock`; ``model(input_ids)`` and ``model.generate(...)`` work,
    each rank on its own sequences. ``model.epmoe`` is the :class:`Lockstep`
    that keeps the EP group in step: ``generate`` runs in ``model.epmoe.session()``;
    plain forwards of ranks that run different numbers of them must too.

    A checkpoint that fails on one rank only (a file missing or broken on one
    host) raises on every rank: the ranks compare after opening the directory
    and after loading, the failing rank raising its own error and the others a
    :class:`CheckpointError` naming it.

    ``moe_options``: further :class:`MoEConfig` fields for every MoE block, e.g.
    ``dict(num_redundant_experts=8, load_window=64, all2all_backend="low_latency",
    max_tokens_per_rank=512)``; a rank then reads from the checkpoint every expert its
    slots hold, copies included. ``model.epmoe.rebalance()`` re-places every block.
    ``dict(score_correction_bias=True, bias_update_rate=1e-3)`` gives a family without
    DeepSeek-V3's bias (Mixtral, Qwen, OLMoE) one for bias balancing: 0 to start (the
    routing is the family's). A checkpoint that :func:`epmoe.hf.save_pretrained` wrote
    with such a bias is loaded with it, and routes with it, without being asked
    (transformers' own class has no such bias and ignores the tensor).

    Training: the model is returned in eval mode; call ``model.train()``, and
    :func:`epmoe.training.average_gradients` after each backward.
    """
    from transformers import GenerationConfig

    path = Path(path)
    try:
        hf_config, family, dtype, reader = _open(path, dtype)
    except (ValueError, OSError) as e:
        _agree(state, e, "opening its checkpoint")
        raise  # (one process: nothing to agree on)
    _agree(state, None, "opening its checkpoint")
    try:
        model, blocks = _build_and_load(path, state, hf_config, family, dtype, reader,
                                        placement, overlap_shared, collect_stats,
                                        dict(moe_options or {}))
    except (ValueError, OSError) as e:
        _agree(state, e, "loading its checkpoint")
        raise
    _agree(state, None, "loading its checkpoint")

    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    model.epmoe = Lockstep(state, list(blocks.values()))
    model.epmoe.reads = reader.reads  # what this rank read, for tests and the curious
    model.get_decoder().register_forward_pre_hook(model.epmoe.before_forward)
    model.register_forward_pre_hook(_no_router_logits, with_kwargs=True)
    hf_generate = model.generate

    def generate(*args, **kwargs):
        with model.epmoe.session():
            return hf_generate(*args, **kwargs)

    generate.__doc__ = hf_generate.__doc__
    model.generate = generate
    return model


def _open(path: Path, dtype):
    """config.json, the family, the dtype, and the reader of the tensors (local work)."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
    hf_config = AutoConfig.from_pretrained(path)
    # The seven families with an adapter of epmoe's own (epmoe's router, bias balancing,
    # bit-identical to transformers); any other MoE model goes through transformers'
    # experts seam (epmoe.hf.seam), its own router routing.
    family = family_of(hf_config) if hf_config.model_type in FAMILIES else None
    try:
        quant = quant_format_of(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    hf_config.output_router_logits = False  # epmoe's blocks return no router logits
    dtype = parse_dtype(dtype) if dtype is not None else _config_dtype(hf_config)
    reader = CheckpointReader(path)
    reader.quant = quant  # FP8 / MXFP4: dense weights dequantized, experts kept quantized
    return hf_config, family, dtype, reader


def _build_and_load(path: Path, state: ParallelState, hf_config, family: Family, dtype,
                    reader: CheckpointReader, placement: str, overlap_shared: bool,
                    collect_stats: bool, moe_options: dict):
    """The model on the meta device with EP blocks (whose configs the EP group
    compares), then filled from the checkpoint: dense weights and this rank's experts."""
    from transformers import AutoModelForCausalLM

    if family is None:  # transformers' experts seam
        if moe_options.get("parallelism", "expert") != "expert":
            raise ValueError("moe_options: from_pretrained loads the experts expert-parallel; "
                             "parallelism='tensor' is for the layer itself")
        # (Llama 4's MoE block is not on the seam: an adapter of its own, epmoe.hf.llama4)
        build = build_llama4_model if hf_config.model_type in LLAMA4_TYPES else build_seam_model
        model, layers = build(path, state, hf_config, dtype, reader, moe_options, collect_stats)
        return model, {i: layer.moe for i, layer in enumerate(layers.values())}
    with torch.device("meta"):  # no weight is allocated here
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    moe_cfg = moe_config_of(hf_config, dtype, placement, overlap_shared)
    family_fields = set(family.moe_fields(hf_config)) | {"hidden_size", "top_k", "dtype"}
    clash = sorted(set(moe_options) & family_fields)
    if clash:
        raise ValueError(f"moe_options cannot set {clash}: they come from {path}/config.json")
    if moe_options.get("parallelism", "expert") != "expert":
        raise ValueError("moe_options: from_pretrained loads the experts expert-parallel; "
                         "parallelism='tensor' is for the layer itself (demo.py --compare)")
    if "score_correction_bias" not in family_fields and \
            _saved_bias(reader, family, len(model.get_decoder().layers)):
        # epmoe's save of a model trained with bias balancing: route with that bias
        moe_options.setdefault("score_correction_bias", True)
    try:
        moe_cfg = moe_cfg.replace(**moe_options)
    except TypeError as e:  # an unknown field
        raise ValueError(f"moe_options: {e}; the fields of MoEConfig are allowed") from None
    layers = model.get_decoder().layers
    blocks: dict[int, ExpertParallelMoE] = {}
    for i, layer in enumerate(layers):
        if type(layer.mlp).__name__ == family.block_class:
            moe = ExpertParallelMoE(moe_cfg, state, seed=None, collect_stats=collect_stats,
                                    name=f"layer {i}")
            if reader.quant is not None:
                keep_experts_quantized(moe, reader.quant)
            layer.mlp = EPMoEBlock(moe, family.returns_router_scores)
            blocks[i] = moe
    if not blocks:
        raise CheckpointError(f"{path}: no {family.block_class} block found in the model")

    rebuild_meta_buffers(model, state.device)
    _load_dense(model, reader, state.device, fp32_patterns(model, dtype))
    native_bias = bool(family.moe_fields(hf_config).get("score_correction_bias"))
    for i, moe in blocks.items():
        _load_moe_block(reader, family, i, moe, native_bias)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    check_nothing_on_meta(model, path)
    reader.close()
    return model, blocks


def _saved_bias(reader: CheckpointReader, family: Family, num_layers: int) -> bool:
    """The checkpoint has a score correction bias on a family without one: written by
    :func:`epmoe.hf.save_pretrained` after bias balancing (transformers ignores it)."""
    return any(f"model.layers.{i}.{p}.{family.router}.e_score_correction_bias" in reader
               for i in range(num_layers) for p in family.prefixes)


def _agree(state: ParallelState, error: BaseException | None, what: str) -> None:
    """Every rank tells whether ``what`` failed on it; if any did, all raise (the
    failing rank its own error, the others a :class:`CheckpointError` naming it)."""
    if state.world_size == 1:
        return
    mine = None if error is None else f"{type(error).__name__}: {error}"
    with guarded(state.heartbeat, what, tuple(range(state.world_size))):
        every = gather_objects(mine, dist.group.WORLD)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(every) if m is not None]
    if failed:
        r, m = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise CheckpointError(f"rank {r} failed {what}: {m}{more}; every rank stopped here")


def _no_router_logits(_module, _args, kwargs):
    if kwargs.get("output_router_logits"):
        raise ValueError("output_router_logits=True: epmoe's MoE blocks do not return router "
                         "logits (nor transformers' auxiliary loss from them)")


def _load_dense(model: nn.Module, reader: CheckpointReader, device: torch.device,
                fp32: list[re.Pattern]) -> None:
    """Every parameter and persistent buffer outside the EP blocks, from the checkpoint."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) \
        if getattr(model.config, "tie_word_embeddings", False) else set()
    skip = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, EPMoEBlock))
    wanted = [(n, t) for n, t in model.named_parameters(remove_duplicate=False)]
    wanted += [(n, b) for n, b in model.named_buffers() if b.is_meta]
    for name, meta in wanted:
        if name.startswith(skip) or (name in tied and name not in reader):
            continue
        dtype = torch.float32 if any(p.search(name) for p in fp32) else meta.dtype
        value = read_weight(reader, name, tuple(meta.shape), reader.quant, dtype)
        set_tensor(model, name, value.to(device=device, dtype=dtype))


@torch.no_grad()
def _load_moe_block(reader: CheckpointReader, family: Family, layer: int,
                    moe: ExpertParallelMoE, native_bias: bool = True) -> None:
    """The router, shared expert and this rank's routed experts of one MoE block.
    ``native_bias``: the family has a score correction bias (else one set by
    ``moe_options``, read when the checkpoint has it, from epmoe's own save)."""
    c = moe.config
    E, H, Fi = c.num_experts, c.hidden_size, c.intermediate_size
    candidates = [f"model.layers.{layer}.{p}" for p in family.prefixes]
    prefix = next((p for p in candidates if f"{p}.{family.router}.weight" in reader), None)
    if prefix is None:
        raise CheckpointError(f"layer {layer}: no router weight in the checkpoint (looked for "
                              + ", ".join(f"{p}.{family.router}.weight" for p in candidates) + ")")
    r = f"{prefix}.{family.router}"
    moe.router_weight.copy_(reader.read(f"{r}.weight", (E, H)))
    if c.router_bias:
        moe.router_bias.copy_(reader.read(f"{r}.bias", (E,)))
    if c.score_correction_bias:
        name = f"{r}.e_score_correction_bias"
        if name in reader or native_bias:
            moe.score_correction_bias.copy_(reader.read(name, (E,)))
        else:  # asked for by moe_options (bias balancing): starts at 0, routing unchanged
            moe.score_correction_bias.zero_()
    if c.shared_intermediate_size:
        s, Fs = f"{prefix}.{family.shared_prefix}", c.shared_intermediate_size
        for t, name, shape in ((moe.shared_gate, "gate_proj", (Fs, H)),
                               (moe.shared_up, "up_proj", (Fs, H)),
                               (moe.shared_down, "down_proj", (H, Fs))):
            t.copy_(read_weight(reader, f"{s}.{name}.weight", shape, reader.quant, t.dtype))
        if c.shared_expert_gate:
            moe.shared_expert_gate.copy_(reader.read(f"{prefix}.shared_expert_gate.weight", (1, H)))

    g, u, d = family.expert_keys
    local = moe.local_experts
    if f"{prefix}.experts.{local[0]}.{g}.weight" in reader:  # one tensor per expert
        # Every rank checks every expert's name and shape (file headers only), so a
        # broken checkpoint fails on all ranks alike; each then reads only its own.
        for e in range(E):
            x = f"{prefix}.experts.{e}"
            for key, shape in ((g, (Fi, H)), (u, (Fi, H)), (d, (H, Fi))):
                check_shape(reader, f"{x}.{key}.weight", shape)
        for i, e in enumerate(local):
            x = f"{prefix}.experts.{e}"
            if moe.quantized is not None:
                load_fp8_expert(reader, moe, i, f"{x}.{g}.weight", f"{x}.{u}.weight",
                                f"{x}.{d}.weight")
                continue
            moe.w_gate[i].copy_(reader.read(f"{x}.{g}.weight", (Fi, H)))
            moe.w_up[i].copy_(reader.read(f"{x}.{u}.weight", (Fi, H)))
            moe.w_down[i].copy_(reader.read(f"{x}.{d}.weight", (H, Fi)))
        return
    fused = f"{prefix}.experts.gate_up_proj"
    down = f"{prefix}.experts.down_proj"
    if moe.quantized is not None and moe.quantized.fmt.method == "mxfp4":  # gpt-oss
        load_mxfp4_experts(reader, moe, fused, down, runs(local))
        if c.expert_bias:
            check_shape(reader, f"{fused}_bias", (E, 2 * Fi))
            check_shape(reader, f"{down}_bias", (E, H))
            for i, a, b in runs(local):
                gub = reader.read(f"{fused}_bias", (E, 2 * Fi), rows=(a, b))
                moe.b_gate[i : i + b - a].copy_(gub[:, 0::2])
                moe.b_up[i : i + b - a].copy_(gub[:, 1::2])
                moe.b_down[i : i + b - a].copy_(reader.read(f"{down}_bias", (E, H), rows=(a, b)))
        return
    if fused not in reader:
        raise CheckpointError(f"layer {layer}: no expert weights in the checkpoint (looked for "
                              f"{prefix}.experts.{local[0]}.{g}.weight and {fused})")
    if family.fused_layout == "concat":
        check_shape(reader, fused, (E, 2 * Fi, H))
        check_shape(reader, down, (E, H, Fi))
    else:
        check_shape(reader, fused, (E, H, 2 * Fi))
        check_shape(reader, down, (E, Fi, H))
    if c.expert_bias:
        check_shape(reader, f"{fused}_bias", (E, 2 * Fi))
        check_shape(reader, f"{down}_bias", (E, H))
    for i, a, b in runs(local):  # stacked tensors: read only this rank's rows
        n = b - a
        if family.fused_layout == "concat":  # [E, 2F, H]: gate rows, then up rows
            gu = reader.read(fused, (E, 2 * Fi, H), rows=(a, b))
            moe.w_gate[i : i + n].copy_(gu[:, :Fi])
            moe.w_up[i : i + n].copy_(gu[:, Fi:])
            moe.w_down[i : i + n].copy_(reader.read(down, (E, H, Fi), rows=(a, b)))
        else:  # "interleaved_t", GPT-OSS: [E, H, 2F], gate and up columns alternate
            gu = reader.read(fused, (E, H, 2 * Fi), rows=(a, b))
            moe.w_gate[i : i + n].copy_(gu[..., 0::2].transpose(1, 2))
            moe.w_up[i : i + n].copy_(gu[..., 1::2].transpose(1, 2))
            moe.w_down[i : i + n].copy_(reader.read(down, (E, Fi, H), rows=(a, b)).transpose(1, 2))
        if c.expert_bias:
            gub = reader.read(f"{fused}_bias", (E, 2 * Fi), rows=(a, b))
            moe.b_gate[i : i + n].copy_(gub[:, 0::2])
            moe.b_up[i : i + n].copy_(gub[:, 1::2])
            moe.b_down[i : i + n].copy_(reader.read(f"{down}_bias", (E, H), rows=(a, b)))


