"""Llama 4 (text) expert-parallel (epmoe.hf.llama4), against transformers, and
``MoEConfig.weigh_input`` (the routing weight on the experts' input) by hand.

Model tests: tiny random checkpoints written by transformers' save_pretrained (MoE and
dense layers mixed, a shared expert, top-1 and top-2 routing, and a multimodal one whose
text part is loaded), loaded on 1, 2 and 3 ranks (one process group per world size):
fp32 logits within 1e-4 and greedy tokens identical, the ranks asking for different
numbers of tokens (some finish first and run dummy steps), each rank reading only its
own experts' rows of the stacked tensors.
"""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from hf_runs import logits_and_tokens  # noqa: E402
from multiproc import run_ranks  # noqa: E402

import epmoe  # noqa: E402
from epmoe import ExpertParallelMoE, MoEConfig  # noqa: E402
from epmoe.hf import from_pretrained  # noqa: E402
from epmoe.hf.llama4 import Llama4EPMoe  # noqa: E402

WORLDS = [1, 2, 3]

# name -> (Llama4TextConfig fields, moe_options)
TEXT = dict(vocab_size=256, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=6,
            max_position_embeddings=64, attention_chunk_size=8, initializer_range=0.1)
CHECKPOINTS = {
    # layers 1 and 3 MoE (every second one), 0 and 2 dense; two experts per token
    "top2": (dict(TEXT, num_hidden_layers=4, num_experts_per_tok=2,
                  interleave_moe_layer_step=2), {}),
    # MoE layers named, tied embeddings, one expert per token, the loop of products
    "top1": (dict(TEXT, num_hidden_layers=3, num_experts_per_tok=1, moe_layers=[0, 2],
                  tie_word_embeddings=True), {"expert_impl": "loop"}),
}


def _save(name: str, root) -> str:
    fields, _ = CHECKPOINTS.get(name, (None, None))
    torch.manual_seed(sum(map(ord, name)))
    if name == "multimodal":  # Llama4ForConditionalGeneration: only its text part is loaded
        config = transformers.Llama4Config(
            text_config=dict(TEXT, num_hidden_layers=2, num_experts_per_tok=1),
            vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, image_size=28, patch_size=14,
                               vision_output_dim=16, projector_input_dim=16,
                               projector_output_dim=16))
        model = transformers.Llama4ForConditionalGeneration(config)
    else:
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**fields))
    model.save_pretrained(root / name)
    return str(root / name)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> tuple[tuple[str, str], ...]:
    root = tmp_path_factory.mktemp("llama4")
    return tuple((n, _save(n, root)) for n in [*CHECKPOINTS, "multimodal"])


def _worker(dirs: dict[str, str]) -> dict:
    warnings.filterwarnings("ignore")
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    out = {}
    for name, path in dirs.items():
        options = CHECKPOINTS.get(name, (None, {}))[1]
        model = from_pretrained(path, state, dtype="float32", moe_options=options)
        logits, tokens = logits_and_tokens(model, state.rank)
        blocks = [m for m in model.modules() if isinstance(m, Llama4EPMoe)]
        out[name] = dict(logits=logits, tokens=tokens, dummy_steps=model.epmoe.dummy_steps,
                         reads=[(k, rows) for k, rows in model.epmoe.reads if rows is not None],
                         local=blocks[0].experts.moe.local_experts, blocks=len(blocks),
                         forwards=[b.experts.moe.forwards for b in blocks])
    return out


@functools.cache
def results(world: int, dirs: tuple[tuple[str, str], ...]) -> list[dict]:
    return run_ranks(_worker, world, dict(dirs), deadline_s=300)


@functools.cache
def reference(path: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = transformers.AutoConfig.from_pretrained(path)
    cls = transformers.Llama4ForCausalLM if config.model_type == "llama4_text" else \
        transformers.Llama4ForConditionalGeneration
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    # (the multimodal class's own forward fails on text alone in transformers 5.24)
    model = getattr(model, "language_model", model)
    return logits_and_tokens(model, rank)


@pytest.mark.parametrize("world", WORLDS)
def test_logits_tokens_and_reads_match_transformers(checkpoints, world):
    per_rank = results(world, checkpoints)
    for name, path in checkpoints:
        for rank, r in enumerate(per_rank):
            got = r[name]
            assert got["blocks"] >= 1 and all(f > 0 for f in got["forwards"]), name
            ref_logits, ref_tokens = reference(path, rank)
            err = (got["logits"] - ref_logits).abs().max().item()
            assert err <= 1e-4, f"{name}, rank {rank}: max abs logit error {err:.3g}"
            assert torch.equal(got["tokens"], ref_tokens), f"{name}, rank {rank}: tokens differ"
            # Each rank reads only its experts' rows, each once: per MoE layer, a run of rows
            # of gate_up_proj and of down_proj covering exactly its experts.
            local = set(got["local"])
            assert len(local) == 6 // world, local
            read = {}
            for key, (a, b) in got["reads"]:
                assert re.search(r"\.feed_forward\.experts\.(gate_up|down)_proj$", key), key
                read.setdefault(key, []).extend(range(a, b))
            assert len(read) == 2 * got["blocks"], sorted(read)
            assert all(sorted(rows) == sorted(local) for rows in read.values()), (name, read)
        if world > 1:  # ranks asked for different numbers of tokens: early ones idled
            assert any(r[name]["dummy_steps"] > 0 for r in per_rank), name


# ----------------------------------------------------------------- weigh_input by hand


def _layer(dtype: torch.dtype, **fields) -> ExpertParallelMoE:
    config = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2,
                       dtype=dtype, router="given", weigh_input=True, **fields)
    return ExpertParallelMoE(config, epmoe.single_process_state("cpu"), seed=1)


def _routing(T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 32, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)])  # [T, 2]
    w = torch.sigmoid(torch.randn(T, 2, generator=g))  # (Llama 4: sigmoid of the logits)
    return x, ids, w


def _by_hand(layer: ExpertParallelMoE, x, ids, w) -> torch.Tensor:
    """Per token and choice: ``x * w`` (in x's dtype), then the expert's MLP; summed."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            xw = x[t : t + 1] * w[t, j].to(x.dtype)
            h = F.silu(F.linear(xw, layer.w_gate[e])) * F.linear(xw, layer.w_up[e])
            out[t] += F.linear(h, layer.w_down[e])[0]
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("fields", [dict(expert_impl="loop"), dict(expert_impl="grouped_mm"),
                                    dict(batch_invariant=True), dict(weigh_in_fp32=True)])
def test_weigh_input_by_hand(dtype, tol, fields):
    layer = _layer(dtype, **fields)
    x, ids, w = _routing(40)
    x = x.to(dtype)
    with torch.no_grad():
        got = layer(x, routing=(w, ids))
        want = _by_hand(layer, x, ids, w)
    assert got.dtype == dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * want.float().abs().max().item(), err
    # and it is not the output weighted: a different layer
    with torch.no_grad():
        out_weighted = ExpertParallelMoE(layer.config.replace(weigh_input=False),
                                         layer.state, seed=1)(x, routing=(w, ids))
    assert (out_weighted.float() - want.float()).abs().max().item() > 10 * max(err, 1e-6)


def test_weigh_input_gradients_match_by_hand():
    layer = _layer(torch.float32, expert_impl="loop")
    x, ids, w = _routing(12)
    x, w = x.requires_grad_(True), w.requires_grad_(True)
    got = layer(x, routing=(w, ids))
    (g_x, g_w, g_up) = torch.autograd.grad(got.square().sum(), (x, w, layer.w_gate_up))
    want = _by_hand(layer, x, ids, w)
    (r_x, r_w, r_up) = torch.autograd.grad(want.square().sum(), (x, w, layer.w_gate_up))
    for a, b in ((got, want), (g_x, r_x), (g_w, r_w), (g_up, r_up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weigh_input_must_be_a_bool():
    with pytest.raises(ValueError, match=r"MoEConfig.weigh_input must be a bool"):
        MoEConfig(hidden_size=8, intermediate_size=8, num_experts=2, weigh_input=1)


def test_weigh_input_fixed_shapes_path_equals_the_counted_one():
    """The host-sync-free path (CUDA graphs) weighs the same rows: absent slots (-1)
    masked, the same sum."""
    from epmoe.experts import (
        ExpertWeights,
        gated_activation,
        grouped_mm_ok,
        local_experts_forward,
        local_experts_forward_fixed,
    )

    layer = _layer(torch.float32)
    experts = ExpertWeights(layer.w_gate_up.detach(), layer.w_down.detach())
    if not grouped_mm_ok(experts):
        pytest.skip("no grouped_mm here")
    x, ids, w = _routing(20)
    ids[::3, 1] = -1  # (that slot's expert lives on another rank)
    glu = gated_activation(layer.config)
    with torch.no_grad():
        fixed = local_experts_forward_fixed(x, ids, w, experts, glu, weigh_input=True)
        counted, _ = local_experts_forward(x, ids, w, experts, glu, "grouped_mm",
                                           weigh_input=True)
    torch.testing.assert_close(fixed, counted, rtol=0, atol=1e-6)


def test_quantized_llama4_is_refused_by_name(checkpoints, tmp_path):
    import json
    import shutil

    from epmoe.hf import CheckpointError, from_pretrained

    src = dict(checkpoints)["top2"]
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"Llama 4 with quantized weights \(fp8\) is not "
                                              r"supported"):
        from_pretrained(tmp_path / "m", epmoe.single_process_state("cpu"))
