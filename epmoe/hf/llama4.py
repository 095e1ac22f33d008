"""Llama 4 (text), expert-parallel: transformers' own model, each MoE block's routed experts
shared out over the EP ranks.

Llama 4's MoE block (``Llama4TextMoe`` in transformers 5.24) does not go through the
experts seam (:mod:`epmoe.hf.seam`), and differs from it in what the experts see:

* its router (``Llama4Router``) takes the top-k logits and uses their sigmoid as the
  weights, 0 for the other experts, in the model's dtype;
* the weight multiplies the expert's *input* (``routed_in = hidden * score``) and the
  experts' outputs are summed unweighted: ``MoEConfig.weigh_input``;
* transformers runs every expert on every token (``hidden.repeat(E, 1) * scores``). An
  unchosen expert's input is then 0 and so is its output (gated MLP without biases,
  ``act(0) * 0``), and adding 0 is exact: only the top-k (token, expert) pairs travel
  here, and the sum is the same;
* a shared expert (``shared_expert``, a dense MLP) on every token;
* experts stored fused, ``gate_up_proj [E, H, 2F]`` (gate columns, then up) and
  ``down_proj [E, F, H]``, in memory and in the checkpoint: the transposes of epmoe's
  ``[E, 2F, H]`` and ``[E, H, F]``;
* only the layers in ``config.moe_layers`` are MoE (``interleave_moe_layer_step``); the
  others run a dense ``Llama4TextMLP`` of ``intermediate_size_mlp``, read whole.

Here each ``Llama4TextMoe`` becomes a :class:`Llama4EPMoe`: transformers' router and
shared expert run as transformers wrote them (replicated), the routed experts are a
:class:`~epmoe.hf.seam.SeamExperts` (``router="given"``, ``weigh_input=True``) holding
this rank's experts only. A multimodal checkpoint (``model_type="llama4"``) loads its
text part (``language_model.*``), as ``Llama4ForCausalLM``.

Shape legend: T tokens on this rank, H hidden, F expert intermediate, E experts, k chosen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import GLU
from ..moe import ExpertParallelMoE
from ..parallel_state import ParallelState
from .checkpoint import CheckpointError, CheckpointReader
from .fill import check_nothing_on_meta, rebuild_meta_buffers
from .seam import SeamExperts
from .seam_load import SeamCheckpoint, load_dense

__all__ = ["LLAMA4_TYPES", "Llama4EPMoe", "build_llama4_model"]

LLAMA4_TYPES = ("llama4", "llama4_text")  # the multimodal config and its text part
TEXT_PREFIX = "language_model."  # the text part's tensors in a multimodal checkpoint


class Llama4EPMoe(nn.Module):
    """Stands in for ``Llama4TextMoe``: ``hidden [.., H] -> (out [T, H], router_logits [T, E])``,
    the routed experts through ``self.experts.moe`` (this rank's)."""

    def __init__(self, block: nn.Module, experts: SeamExperts) -> None:
        super().__init__()
        self.top_k, self.hidden_dim = block.top_k, block.hidden_dim
        self.num_experts = block.num_experts
        self.router = block.router  # transformers' Llama4Router, replicated
        self.shared_expert = block.shared_expert  # transformers' Llama4TextMLP, replicated
        self.experts = experts

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        x_TH = hidden_states.reshape(-1, self.hidden_dim)
        scores_TE, logits_TE = self.router(x_TH)  # sigmoid of the top-k logits, 0 elsewhere
        # The router's own choice: the same topk on the same logits (it returns no indices).
        ids_TK = torch.topk(logits_TE, self.top_k, dim=1).indices  # [T, k]
        weights_TK = scores_TE.gather(1, ids_TK)  # [T, k], in the model's dtype
        out_TH = self.shared_expert(x_TH)
        out_TH.add_(self.experts(x_TH, ids_TK, weights_TK))  # (transformers' order)
        return out_TH, logits_TE


class _TextPart:
    """A multimodal checkpoint's text tensors under the text model's names (the
    ``language_model.`` prefix dropped); reads are recorded by the reader itself."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader, self.path, self.quant = reader, reader.path, reader.quant

    def dtype(self, name: str) -> str:
        return self.reader.dtype(TEXT_PREFIX + name)

    def keys(self) -> list[str]:
        return [k.removeprefix(TEXT_PREFIX) for k in self.reader.keys()
                if k.startswith(TEXT_PREFIX)]

    def __contains__(self, name: str) -> bool:
        return TEXT_PREFIX + name in self.reader

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(TEXT_PREFIX + name)

    def read(self, name: str, shape: tuple[int, ...] | None = None,
             rows: tuple[int, int] | None = None, quantized: bool = False) -> Tensor:
        return self.reader.read(TEXT_PREFIX + name, shape, rows=rows, quantized=quantized)


def _activation(text_config) -> tuple[str, GLU | None]:
    """``MoEConfig.activation`` of the experts (``act(gate) * up``), and the gated product
    when it is not one of epmoe's own."""
    from transformers.activations import ACT2FN

    act = text_config.hidden_act
    if act == "silu":
        return "silu", None
    if act == "gelu":  # (exact GELU, as epmoe's "gelu")
        return "gelu", None
    fn = ACT2FN[act]
    return "custom", lambda g, u: fn(g) * u


def build_llama4_model(path, state: ParallelState, hf_config, dtype: torch.dtype,
                       reader: CheckpointReader, options: dict, collect_stats: bool):
    """``Llama4ForCausalLM`` on the meta device, each ``Llama4TextMoe`` replaced by a
    :class:`Llama4EPMoe`, then filled: dense weights whole, this rank's experts' rows of
    the stacked tensors. ``options``: further :class:`MoEConfig` fields. Returns the
    model and its EP layers (:class:`SeamExperts`) by experts module name, in order;
    the contract of :func:`~epmoe.hf.seam_load.build_seam_model`."""
    from transformers import Llama4ForCausalLM

    if reader.quant is not None:  # (its experts take the weight on their input rows,
        # which epmoe's quantized experts do not run)
        raise CheckpointError(f"{path}: Llama 4 with quantized weights "
                              f"({reader.quant.method}) is not supported by epmoe; load its "
                              "bf16 checkpoint")
    text_config = getattr(hf_config, "text_config", hf_config)  # ("llama4": its text part)
    with torch.device("meta"):  # no weight is allocated here
        model = Llama4ForCausalLM._from_config(text_config, dtype=dtype)
    activation, glu = _activation(text_config)
    config = MoEConfig(hidden_size=text_config.hidden_size,
                       intermediate_size=text_config.intermediate_size,
                       num_experts=text_config.num_local_experts,
                       top_k=text_config.num_experts_per_tok, dtype=dtype, router="given",
                       activation=activation, weigh_input=True).replace(**options)
    layers: dict[str, SeamExperts] = {}
    for i, decoder_layer in enumerate(model.model.layers):
        if not decoder_layer.is_moe_layer:  # a dense Llama4TextMLP: loaded with the rest
            continue
        moe = ExpertParallelMoE(config, state, seed=None, collect_stats=collect_stats,
                                name=f"layer {i}", glu=glu)
        experts = SeamExperts(moe, "Llama4TextExperts")
        decoder_layer.feed_forward = Llama4EPMoe(decoder_layer.feed_forward, experts)
        layers[f"model.layers.{i}.feed_forward.experts"] = experts
    if not layers:
        raise CheckpointError(f"{path}: no MoE layer in this Llama 4 model (moe_layers="
                              f"{text_config.moe_layers})")
    rebuild_meta_buffers(model, state.device)
    source = _TextPart(reader) if hf_config is not text_config else reader
    # Llama 4's stacks are [E, H, 2F] and [E, F, H]: the seam's transposed layout
    ckpt = SeamCheckpoint(model, source, dict.fromkeys(layers, True))
    load_dense(model, ckpt, layers, path, dtype, state.device)
    for name, experts in layers.items():
        ckpt.load_experts(name, experts)
    if text_config.tie_word_embeddings:
        model.tie_weights()
    check_nothing_on_meta(model, path)
    reader.close()
    return model, layers
