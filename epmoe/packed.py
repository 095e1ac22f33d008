"""``pack_for_inference``: bf16 weights prepacked for oneDNN, for faster inference on the CPU.

oneDNN reorders a weight once into the blocked layout its kernels read
(``torch.ops.mkldnn._reorder_linear_weight``); ``F.linear`` on a plain weight
has to work from the plain layout on every call. Measured on the AMD EPYC (Zen
5, AVX-512 BF16) at one thread, 48 weights ``[4096, 1024]`` cycled (out of
cache): 1.7-2.4x faster for M = 1..16 rows, 1.2x at 64, about the same at 2048;
the serving benchmark's Qwen3-MoE forward (``benchmarks/packed.py``): 1.5x for 16
one-token sequences, 1.4x for 64, 1.04x for a 2048-token prefill. The packed
product gives exactly ``F.linear``'s bits in bf16, with a fused bias too (rows
from 1 to 600 tried, any pack hint, one and two threads), so a packed model's
logits equal the plain model's bit for bit (``tests/test_packed.py``). Only bf16
is packed: in fp32 the packed product rounds differently, and oneDNN refuses to
pack fp16 on CPUs without AVX512-FP16 or AVX-NE-CONVERT (this one).

What is packed (shape legend as in :mod:`epmoe.experts`: e local experts, H
hidden, F expert intermediate, Fs shared intermediate):

* every plain ``nn.Linear`` with a bf16 CPU weight (attention projections, dense
  MLPs, the LM head) becomes a :class:`PackedLinear`;
* every :class:`~epmoe.moe.ExpertParallelMoE` in bf16 becomes a :class:`PackedMoE`:
  each expert's ``[2F, H]`` and ``[H, F]`` and the shared expert's ``[Fs, H]``,
  ``[Fs, H]``, ``[H, Fs]`` packed one by one (:func:`~epmoe.experts_packed.packed_experts`
  repeats the unpacked layer's path, loop or grouped_mm, with its bits).

Memory: the packed copy replaces the plain weight (freed unless held elsewhere),
one weight at a time (one layer's expert stack at a time), so the model keeps its
size: packed ``[4096, 1024]``, ``[1024, 1024]`` and ``[256, 1024]`` bf16 weights
took their plain bytes within 0.3% (resident set; oneDNN pads only to its blocks).
Routers, norms, embeddings and biases stay plain. A tied LM head (``tie_word_embeddings``) is
the exception: the embedding keeps the plain matrix and the head gets a packed
copy, ``V * H * 2`` bytes more (``PackReport.copied_bytes``).

Inference only: the plain weights are gone, so whatever would read or change
them raises :class:`PackedError` naming ``pack_for_inference``: a forward that
records autograd (run under ``torch.no_grad()`` or ``torch.inference_mode()``;
``generate`` and the serving engine do), ``model.train()``, ``state_dict`` and
``load_state_dict`` (hence ``epmoe.hf.save_pretrained``), ``.to()``/``.float()``,
``rebalance``, ``load_full_weights``, ``reset_parameters`` and the expert stacks
(``w_gate_up``, ``w_down``, ``w_gate``, ``w_up``, ``expert_tensors()``). Load the
checkpoint again for any of those. ``train()`` and ``.to()`` raise when they reach
the first packed module, after transformers' modules before it were switched or
converted: ``eval()`` undoes the first; after the second, load again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .experts import grouped_mm_ok
from .experts_packed import PackedExperts, packed_linear
from .moe import ExpertParallelMoE

__all__ = ["PACKED_DTYPES", "PackReport", "PackedError", "PackedLinear", "PackedMoE",
           "can_pack", "pack_for_inference"]

# Dtypes whose packed product has F.linear's bits, checked on this CPU (tests/test_packed.py
# checks it again wherever the suite runs). Not fp32 (other bits), not fp16 (refused here).
PACKED_DTYPES = (torch.bfloat16,)


class PackedError(RuntimeError):
    """An operation that needs the plain weights, on a model packed for inference.

    Not an ``AttributeError``: ``getattr(layer, "w_down", None)`` must raise too, not
    pass for a missing weight."""


def _refuse(what: str, where: str = "this model") -> PackedError:
    return PackedError(f"{what}: {where} was packed for inference by "
                       "epmoe.packed.pack_for_inference (its weights are in oneDNN's blocked "
                       "layout, the plain ones gone); load the checkpoint again for this")


def can_pack(t: Tensor) -> bool:
    """``t`` is a weight this CPU packs with ``F.linear``'s bits: bf16 on the CPU, with
    oneDNN's native bf16 (without it ``F.linear`` takes another kernel)."""
    return (t.dtype in PACKED_DTYPES and t.device.type == "cpu" and t.dim() == 2
            and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(w_NK: Tensor, batch_hint: int | None = None) -> Tensor:
    """``w [N, K]`` reordered into oneDNN's blocked layout: an opaque ``[N, K]`` tensor
    (``layout=torch._mkldnn``) that only :func:`~epmoe.experts_packed.packed_linear` reads.
    ``batch_hint``: the rows oneDNN should expect (no measurable effect here)."""
    return torch.ops.mkldnn._reorder_linear_weight(w_NK.detach(), batch_hint)


def _check_no_grad(x: Tensor, where: str) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise _refuse("a forward that records autograd (training)", where) from None


def _refuse_state_dict(module: nn.Module, *args, **kwargs) -> None:
    raise _refuse("state_dict() / load_state_dict() / save_pretrained")


class _InferenceOnly:
    """What both packed modules refuse (mixed in before ``nn.Module``)."""

    def train(self, mode: bool = True):
        if mode:
            raise _refuse("train()")
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .float(), .cuda(): would convert the plain tensors and not the packed ones
        raise _refuse(".to() / .float() / .half() / moving devices")


class PackedLinear(_InferenceOnly, nn.Module):
    """Stands in for an ``nn.Linear``: ``x [..., K] -> [..., N]`` with the weight prepacked.

    The packed weight is a plain attribute (``packed``), not a parameter: it is in no
    ``state_dict`` (which raises) and no optimiser's list. The bias stays plain."""

    def __init__(self, linear: nn.Linear, packed_NK: Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = packed_NK
        self.plain_bias = None if linear.bias is None else linear.bias.detach()  # [N]
        self.register_state_dict_pre_hook(_refuse_state_dict)
        self.register_load_state_dict_pre_hook(_refuse_state_dict)

    @property
    def weight(self) -> Tensor:
        raise _refuse("the weight of a PackedLinear")

    def forward(self, x: Tensor) -> Tensor:
        _check_no_grad(x, "a PackedLinear")
        return packed_linear(x, self.packed, self.plain_bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.plain_bias is not None}, packed for oneDNN")


def _refused_weight(name: str) -> property:
    def get(self):
        raise _refuse(f"{name} of {self.name}", self.name)
    return property(get)


class PackedMoE(_InferenceOnly, ExpertParallelMoE):
    """An :class:`~epmoe.moe.ExpertParallelMoE` whose routed and shared experts are
    prepacked. Made from a loaded layer by :func:`pack_for_inference` (its class is
    swapped: the layer keeps its identity, in ``model.epmoe.layers`` too), never built.

    Forward, routing, dispatch and statistics are the layer's own; only the expert
    products change (``_experts`` returns :class:`~epmoe.experts_packed.PackedExperts`, which
    ``run_experts`` sends to ``packed_experts``)."""

    packed: PackedExperts
    packed_shared: dict[str, Tensor]  # shared_gate, shared_up [Fs, H], shared_down [H, Fs]
    packed_bytes: int  # bytes of the plain expert weights that were packed

    w_gate_up = _refused_weight("w_gate_up")
    w_down = _refused_weight("w_down")
    w_gate = _refused_weight("w_gate")
    w_up = _refused_weight("w_up")
    shared_gate = _refused_weight("shared_gate")
    shared_up = _refused_weight("shared_up")
    shared_down = _refused_weight("shared_down")

    def forward(self, x_TH: Tensor) -> Tensor:
        _check_no_grad(x_TH, self.name)
        return super().forward(x_TH)

    def _experts(self) -> PackedExperts:
        return self.packed

    def _shared_mlp(self, x_TH: Tensor) -> Tensor:  # ExpertParallelMoE._shared_mlp, packed
        p = self.packed_shared
        g, u = packed_linear(x_TH, p["shared_gate"]), packed_linear(x_TH, p["shared_up"])
        y_TH = packed_linear(self._glu(g, u), p["shared_down"])
        if self.config.shared_expert_gate:  # ([1, H]: left plain)
            y_TH = torch.sigmoid(torch.nn.functional.linear(x_TH, self.shared_expert_gate)) * y_TH
        return y_TH

    def expert_tensors(self) -> list[Tensor]:
        raise _refuse("expert_tensors() (rebalance, training)", self.name)

    def expert_weight_bytes(self) -> int:
        return self.packed_bytes

    def rebalance(self, *args, **kwargs):
        raise _refuse("rebalance()", self.name)

    def load_full_weights(self, *args, **kwargs) -> None:
        raise _refuse("load_full_weights()", self.name)

    def reset_parameters(self, seed: int = 0) -> None:
        raise _refuse("reset_parameters()", self.name)


@dataclass
class PackReport:
    """What :func:`pack_for_inference` did. Bytes are the plain weights' (bf16: 2 a number)."""

    linears: int = 0  # nn.Linear modules now PackedLinear
    linear_bytes: int = 0
    moe_layers: int = 0  # ExpertParallelMoE layers now PackedMoE
    expert_bytes: int = 0  # routed experts
    shared_bytes: int = 0  # shared experts
    copied_bytes: int = 0  # packed copies of weights also kept plain (a tied LM head)
    skipped: list[str] = field(default_factory=list)  # "name: why"

    @property
    def bytes(self) -> int:
        return self.linear_bytes + self.expert_bytes + self.shared_bytes


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@torch.no_grad()
def _pack_moe(layer: ExpertParallelMoE, batch_hint: int | None, report: PackReport) -> None:
    plain = layer._experts()  # (b_down as this rank adds it: None on TP ranks > 0)
    e = plain.w_down.shape[0]
    layer.packed = PackedExperts(
        tuple(pack_weight(plain.w_gate_up[i], batch_hint) for i in range(e)),
        tuple(pack_weight(plain.w_down[i], batch_hint) for i in range(e)),
        plain.b_gate_up, plain.b_down, grouped_mm_ok(plain))
    layer.packed_bytes = _nbytes(plain.w_gate_up) + _nbytes(plain.w_down)
    report.expert_bytes += layer.packed_bytes
    shared = ("shared_gate", "shared_up", "shared_down") \
        if layer.config.shared_intermediate_size else ()
    layer.packed_shared = {n: pack_weight(getattr(layer, n), batch_hint) for n in shared}
    report.shared_bytes += sum(_nbytes(getattr(layer, n)) for n in shared)
    for name in ("w_gate_up", "w_down", *shared):
        del layer._parameters[name]  # (the plain stacks are freed here)
    layer.__class__ = PackedMoE
    layer.register_state_dict_pre_hook(_refuse_state_dict)
    layer.register_load_state_dict_pre_hook(_refuse_state_dict)
    report.moe_layers += 1


def pack_for_inference(model: nn.Module, batch_hint: int | None = None) -> PackReport:
    """Prepack ``model``'s bf16 CPU weights for oneDNN, in place; returns what was packed.

    ``model``: from :func:`epmoe.hf.from_pretrained` (or any module holding
    ``nn.Linear`` and :class:`~epmoe.moe.ExpertParallelMoE` layers). Logits stay
    bit-identical in bf16. Memory: the same (each packed weight replaces its plain one),
    plus ``report.copied_bytes`` for a tied LM head. See the module docstring for what
    is packed and what is refused afterwards. Weights of other dtypes or devices are left as
    they are (listed in ``report.skipped``): an fp32 or fp16 model comes back unchanged.
    Raises ``ValueError``, before changing anything, for a layer set to rebalance
    itself (``rebalance_interval``): a packed layer cannot move its experts.
    """
    report = PackReport()
    modules = list(model.named_modules())
    for name, m in modules:
        if isinstance(m, ExpertParallelMoE) and not isinstance(m, PackedMoE) \
                and m.config.rebalance_interval:
            raise ValueError(f"pack_for_inference: {name} has rebalance_interval="
                             f"{m.config.rebalance_interval}; a packed layer cannot move its "
                             "experts (load it with rebalance_interval=0)")
    # Owners of every parameter, by storage: a packed weight also held by an unpacked
    # module (a tied LM head and its embedding) is a copy, not a replacement.
    owners: dict[int, set[str]] = {}
    for mod_name, m in modules:
        for p in m.parameters(recurse=False):
            owners.setdefault(p.data_ptr(), set()).add(mod_name)
    linears = {n for n, m in modules if type(m) is nn.Linear and can_pack(m.weight)}
    done: dict[int, Tensor] = {}  # one packed tensor per plain storage
    for name, m in modules:
        if isinstance(m, ExpertParallelMoE) and not isinstance(m, PackedMoE):
            if m.quantized is not None:  # FP8/MXFP4: dequantized per expert, not packed
                report.skipped.append(f"{name}: quantized experts "
                                      f"({m.quantized.fmt.method})")
            elif can_pack(m.w_down[0]):
                _pack_moe(m, batch_hint, report)
            else:
                report.skipped.append(f"{name}: {m.config.dtype} on {m.w_down.device}")
        elif type(m) is nn.Linear:
            if name not in linears:
                report.skipped.append(f"{name}: {m.weight.dtype} on {m.weight.device}")
                continue
            ptr = m.weight.data_ptr()
            if ptr not in done:
                done[ptr] = pack_weight(m.weight, batch_hint)
                report.linear_bytes += _nbytes(m.weight)
                if owners[ptr] - linears:
                    report.copied_bytes += _nbytes(m.weight)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, PackedLinear(m, done[ptr]))
            report.linears += 1
    return report
