"""Loading a model through transformers' experts seam: checkpoint names, dense weights, experts.

Hub checkpoints name their tensors as the family's release did; transformers
renames them on load (``transformers/conversion_mapping.py``: ``.block_sparse_moe.``
becomes ``.mlp.``, per-expert ``experts.{e}.w1/w3/w2`` become the stacked
``experts.gate_up_proj``/``down_proj``, a multimodal prefix moves, ...). Here
transformers' own list of transforms for the model (``get_model_conversion_mapping``)
names every checkpoint tensor in the model, so a family needs no table of ours.
Dense tensors are read whole (replicated); each rank reads only its own experts:
one tensor per expert, or its rows of a stacked tensor.

Shape legend: E experts, e this rank's, H hidden, F expert intermediate.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, CheckpointReader
from .fill import (
    check_nothing_on_meta,
    check_shape,
    fp32_patterns,
    rebuild_meta_buffers,
    runs,
    set_tensor,
)
from .quant_load import keep_experts_quantized, load_fp8_expert, read_weight
from .seam import SeamExperts

__all__ = ["SeamCheckpoint"]


class SeamCheckpoint:
    """Where each tensor of ``model`` is in the checkpoint ``reader``."""

    def __init__(self, model: nn.Module, reader: CheckpointReader,
                 transposed: dict[str, bool]) -> None:
        """``transposed``: for each experts module by its name in ``model`` (which holds
        EP layers in their places), whether transformers keeps its stacks transposed in
        memory (``[E, H, 2F]`` and ``[E, F, H]``: the decorator's ``is_transposed``)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            apply_renamings,
            rename_source_key,
        )

        self.reader, self.transposed = reader, transposed
        experts = transposed  # (the experts modules' names, for the lookups below)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        roles = _expert_roles(converters)
        meta = model.state_dict(keep_vars=True)  # (transformers reads its values: not None)
        prefix = getattr(model, "base_model_prefix", None)
        self.dense: dict[str, str] = {}  # model name -> checkpoint name
        self._to_convert = {}  # (converter, model name) -> (converter, [(key, its pattern)])
        # experts module name -> {"fused": {part: (checkpoint name, transformers' transpose:
        #                                          None, "always" or "if_shape_differs")},
        #                          "per_expert": {(e, role): checkpoint name}}
        self.expert_keys: dict[str, dict] = {n: {"fused": {}, "per_expert": {}} for n in experts}
        per_expert = re.compile(r"^(.*)\.(\d+)\.([^.]+\.weight)$")
        for key in reader.keys():
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            owner, _, part = name.rpartition(".")
            m = per_expert.match(name)
            if m and m.group(1) in experts and m.group(3) in roles:  # (no converter needed)
                self.expert_keys[m.group(1)]["per_expert"][(int(m.group(2)),
                                                            roles[m.group(3)])] = key
                continue
            if owner in experts and part in ("gate_up_proj", "down_proj"):
                conv = next(c for c in converters if pattern in c.source_patterns) \
                    if pattern is not None else None
                ops = [type(o).__name__ for o in (conv.operations if conv else [])]
                if m := per_expert.match(apply_renamings(key, renamings)):
                    if m.group(3) in roles:
                        self.expert_keys[owner]["per_expert"][(int(m.group(2)),
                                                               roles[m.group(3)])] = key
                        continue
                elif set(ops) <= {"Transpose"}:  # the stacked tensor itself, maybe transposed
                    flip = None if not ops else "if_shape_differs" if any(
                        getattr(o, "check_dims", False) for o in conv.operations) else "always"
                    self.expert_keys[owner]["fused"][part] = (key, flip)
                    continue
                raise CheckpointError(f"{reader.path}: the expert tensor {key!r} needs "
                                      f"transformers' conversion {ops}, which epmoe does not "
                                      "read per expert")
            if pattern is not None:  # a dense tensor transformers converts (fuses, splits)
                conv = next(c for c in converters if pattern in c.source_patterns)
                self._to_convert.setdefault((id(conv), name), (conv, []))[1].append(
                    (key, pattern))
                continue
            self.dense[name] = key
        self._model = model
        self._converted: dict[str, Tensor] | None = None

    _to_convert: dict

    def read_dense(self, name: str, shape: tuple[int, ...],
                   dtype: torch.dtype) -> Tensor | None:
        """The dense tensor ``name`` of the model, read whole (or made by transformers'
        conversion from the tensors it is made of), ``None`` if the checkpoint lacks it."""
        key = self.dense.get(name)
        if key is not None:
            return read_weight(self.reader, key, shape, self.reader.quant, dtype)
        if self._converted is None:
            self._converted = self._convert()
        value = self._converted.pop(name, None)
        if value is not None and tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"{self.reader.path}: {name!r} made by transformers' conversion "
                                  f"has shape {tuple(value.shape)}, expected {tuple(shape)}")
        return value

    def _convert(self) -> dict[str, Tensor]:
        """Dense tensors that transformers converts on load (a vision tower's fused qkv, ...),
        through transformers' own converters (replicated weights: read whole)."""
        import copy

        out: dict[str, Tensor] = {}
        for (_, name), (conv, sources) in self._to_convert.items():
            conv = copy.deepcopy(conv)  # (it collects the tensors it converts)
            for key, pattern in sources:
                conv.add_tensor(name, key, pattern, lambda k=key: self.reader.read(k))
            out.update(conv.convert(name, model=self._model, config=self._model.config))
        return out

    @torch.no_grad()
    def load_experts(self, name: str, layer: SeamExperts) -> None:
        """This rank's experts of the module ``name`` into ``layer.moe``."""
        moe, in_memory_transposed = layer.moe, self.transposed[name]
        c = moe.config
        E, H, Fi = c.num_experts, c.hidden_size, c.intermediate_size
        keys, local = self.expert_keys[name], moe.local_experts
        quant = moe.quantized is not None
        if quant and (moe.quantized.fmt.method != "fp8" or not keys["per_expert"]):
            stored = "per expert" if keys["per_expert"] else "stacked"
            raise CheckpointError(f"{self.reader.path}: {moe.quantized.fmt.method} experts of "
                                  f"{name} stored {stored}: epmoe keeps quantized experts of the "
                                  "seam families as fp8 tensors per expert (DeepSeek's layout) "
                                  "only")
        if keys["per_expert"]:
            want = {"gate": (Fi, H), "up": (Fi, H), "down": (H, Fi)}
            # Every rank checks every expert's name and shape (file headers only), so a
            # broken checkpoint fails on all ranks alike; each then reads only its own.
            for e in range(E):
                for role, shape in want.items():
                    key = keys["per_expert"].get((e, role))
                    if key is None:
                        raise CheckpointError(f"{self.reader.path}: no {role} weight of expert "
                                              f"{e} of {name}")
                    check_shape(self.reader, key, shape)
            for i, e in enumerate(local):
                if quant:
                    load_fp8_expert(self.reader, moe, i, *(keys["per_expert"][(e, r)]
                                                           for r in ("gate", "up", "down")))
                    continue
                read = {r: self.reader.read(keys["per_expert"][(e, r)], s)
                        for r, s in want.items()}
                moe.w_gate[i].copy_(read["gate"])
                moe.w_up[i].copy_(read["up"])
                moe.w_down[i].copy_(read["down"])
            return
        fused = keys["fused"]
        if set(fused) != {"gate_up_proj", "down_proj"}:
            raise CheckpointError(f"{self.reader.path}: no expert weights of {name} (neither "
                                  f"{name}.{{e}}.<proj>.weight nor {name}.gate_up_proj and "
                                  "down_proj)")
        # epmoe's layout is [E, rows, cols]: [E, 2F, H] and [E, H, F]. The module's may be
        # transposed, and the file's transposed from the module's (transformers' Transpose
        # conversion: always, or only where the shapes differ, as transformers decides).
        for part, rows in (("gate_up_proj", 2 * Fi), ("down_proj", H)):
            cols = H if part == "gate_up_proj" else Fi
            key, flip = fused[part]
            mem = (E, cols, rows) if in_memory_transposed else (E, rows, cols)
            flipped = flip == "always" or (flip == "if_shape_differs"
                                           and self.reader.shape(key) != mem)
            shape = (mem[0], mem[2], mem[1]) if flipped else mem
            check_shape(self.reader, key, shape)
            transposed = flipped != in_memory_transposed  # the file holds [E, cols, rows]
            for i, a, b in runs(local):  # read only this rank's experts' rows
                t = self.reader.read(key, shape, rows=(a, b))
                t = t.transpose(1, 2) if transposed else t
                (moe.w_gate_up if part == "gate_up_proj" else moe.w_down)[i : i + b - a].copy_(t)


def _expert_roles(converters) -> dict[str, str]:
    """Per-expert leaf names (``"w1.weight"``) -> ``"gate"``, ``"up"`` or ``"down"``, from
    the converters that stack them (sources concatenated in order: gate, then up)."""
    roles: dict[str, str] = {}
    for conv in converters:
        targets, sources = conv.target_patterns, conv.source_patterns
        if len(targets) != 1 or not all(".*." in s for s in sources):
            continue
        leaves = [s.rsplit(".*.", 1)[1] for s in sources]
        if targets[0].endswith("gate_up_proj") and len(leaves) == 2:
            roles.update({leaves[0]: "gate", leaves[1]: "up"})
        elif targets[0].endswith("down_proj") and len(leaves) == 1:
            roles[leaves[0]] = "down"
    for gate, up, down in (("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
                           ("w1.weight", "w3.weight", "w2.weight")):
        for leaf, role in ((gate, "gate"), (up, "up"), (down, "down")):
            roles.setdefault(leaf, role)
    return roles


def model_class(hf_config):
    """transformers' class for ``hf_config``: its causal LM, else the class its
    ``config.json`` names (Mistral 4; the multimodal families, whose text part is used)."""
    import transformers
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(hf_config) in mapping:
        return mapping[type(hf_config)]
    for arch in getattr(hf_config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise CheckpointError(f"model_type={hf_config.model_type!r}: transformers has no causal LM "
                          f"for it and config.json names no transformers class (architectures="
                          f"{getattr(hf_config, 'architectures', None)})")


def build_seam_model(path, state, hf_config, dtype: torch.dtype, reader: CheckpointReader,
                     options: dict, collect_stats: bool):
    """transformers' model on the meta device, each experts module replaced by a
    :class:`SeamExperts`, then filled: dense weights whole, this rank's experts.
    Returns the model and its EP layers by experts module name, in the model's order."""
    from .seam import experts_modules, seam_layer

    with torch.device("meta"):  # no weight is allocated here
        model = model_class(hf_config)._from_config(hf_config, dtype=dtype)
    found = experts_modules(model)
    if not found:
        raise CheckpointError(f"{path}: model_type={hf_config.model_type!r} has no experts "
                              "module that goes through transformers' experts seam "
                              "(@use_experts_implementation): not a supported MoE model")
    text_config = found[0][1].config if hasattr(found[0][1], "config") else hf_config
    layers: dict[str, SeamExperts] = {}
    for name, module in found:
        layer = seam_layer(module, text_config, state, dtype, options, name, collect_stats)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer)
        if reader.quant is not None:
            keep_experts_quantized(layer.moe, reader.quant)
        layers[name] = layer
    rebuild_meta_buffers(model, state.device)
    ckpt = SeamCheckpoint(model, reader, {n: m.is_transposed for n, m in found})
    load_dense(model, ckpt, layers, path, dtype, state.device)
    for name, layer in layers.items():
        ckpt.load_experts(name, layer)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    check_nothing_on_meta(model, path)
    reader.close()
    return model, layers


def load_dense(model: nn.Module, ckpt: SeamCheckpoint, layers: dict, path, dtype: torch.dtype,
               device: torch.device) -> None:
    """Every parameter and persistent buffer of ``model`` outside the EP ``layers``, read
    whole (dequantized from FP8 where the checkpoint stores it so), in the model's dtype
    or in fp32 where transformers keeps it (``_keep_in_fp32_modules``)."""
    fp32 = fp32_patterns(model, dtype)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) \
        if getattr(model.config.get_text_config(), "tie_word_embeddings", False) else set()
    skip = tuple(f"{n}." for n in layers)
    wanted = list(model.named_parameters(remove_duplicate=False))
    wanted += [(n, b) for n, b in model.named_buffers() if b.is_meta]
    for name, meta in wanted:
        if name.startswith(skip):
            continue
        dt = torch.float32 if any(p.search(name) for p in fp32) else meta.dtype
        value = ckpt.read_dense(name, tuple(meta.shape), dt)
        if value is None:
            if name in tied or not meta.is_meta:
                continue
            raise CheckpointError(f"{path}: no tensor for {name!r} in the checkpoint")
        set_tensor(model, name, value.to(device=device, dtype=dt))
