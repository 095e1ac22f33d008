"""FP8 and MXFP4 checkpoints loaded expert-parallel with their experts kept quantized.

The checkpoints are written by ``tests/quant_checkpoints.py`` in the published layouts
(DeepSeek's FP8 blocks for DeepSeek-V3 and Qwen3, gpt-oss's MXFP4; proof of the layout:
transformers loads them, ``tests/test_quant.py``), plus a seam family (GLM-4.5) in FP8.
transformers' CPU load dequantizes every weight to the model's dtype; epmoe dequantizes
the replicated ones at load and each expert when it computes, so in fp32 the two compute
with the same numbers: logits within 1e-4, at EP 1, 2 and 3, each rank reading only its
own experts and holding about half (FP8) or a quarter (MXFP4) of their bf16 bytes."""

from __future__ import annotations

import functools
import json
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_runs import expert_reads, logits_and_tokens, rank_inputs  # noqa: E402
from multiproc import run_ranks  # noqa: E402
from quant_checkpoints import save_fp8_checkpoint, save_mxfp4_checkpoint  # noqa: E402

import epmoe  # noqa: E402
from epmoe.hf import from_pretrained  # noqa: E402
from epmoe.hf.tiny_families import save_tiny_seam_checkpoint  # noqa: E402
from epmoe.quant import fp8_scale_name, quantize_fp8_blocks  # noqa: E402

WORLDS = [1, 2, 3]
NAMES = ["deepseek_v3_fp8", "qwen3_moe_fp8", "gpt_oss_mxfp4", "glm4_moe_fp8"]


def _seam_fp8(out, block=(16, 16)):
    """GLM-4.5 (a seam family) in DeepSeek's FP8 layout: every linear weight but the
    router and lm_head, block scales beside each."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_seam_checkpoint("glm4_moe", out, seed=5, dtype=torch.bfloat16)
    out_t = {}
    for name, t in load_file(str(path / "model.safetensors")).items():
        if name.endswith(".weight") and t.ndim == 2 and not re.search(
                r"(embed_tokens|norm|lm_head|mlp\.gate\.weight)", name):
            out_t[name], out_t[fp8_scale_name(name)] = quantize_fp8_blocks(t, block)
        else:
            out_t[name] = t
    save_file(out_t, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "fmt": "e4m3", "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def quant_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("quant")
    return {
        "deepseek_v3_fp8": str(save_fp8_checkpoint("deepseek_v3", root / "ds", (8, 8))),
        "qwen3_moe_fp8": str(save_fp8_checkpoint("qwen3_moe", root / "qwen", (16, 16))),
        "gpt_oss_mxfp4": str(save_mxfp4_checkpoint(root / "gpt")),
        "glm4_moe_fp8": str(_seam_fp8(root / "glm")),
    }


def _worker(dirs: dict[str, str]) -> dict:
    warnings.filterwarnings("ignore")
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    out = {}
    for name, path in dirs.items():
        model = from_pretrained(path, state, dtype="float32")
        logits, tokens = logits_and_tokens(model, state.rank)
        layers = model.epmoe.layers
        out[name] = dict(
            logits=logits, tokens=tokens, local=[m.local_experts for m in layers],
            quantized=[m.quantized is not None and m.w_gate_up is None for m in layers],
            expert_bytes=[m.quantized.nbytes() for m in layers],
            bf16_bytes=[len(m.local_experts) * 3 * m.config.hidden_size
                        * m.config.intermediate_size * 2 for m in layers],
            reads=expert_reads(model))
    return out


@functools.cache
def results(world: int, dirs: tuple[tuple[str, str], ...]) -> list[dict]:
    return run_ranks(_worker, world, dict(dirs), deadline_s=600)


@functools.cache
def reference(path: str, rank: int, dtype: torch.dtype = torch.float32):
    warnings.filterwarnings("ignore")  # ("FP8 needs a GPU: dequantizing")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return logits_and_tokens(model, rank)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", NAMES)
def test_quantized_checkpoints_match_transformers_dequantized_load(quant_checkpoints, world,
                                                                   name):
    for rank, r in enumerate(results(world, tuple(sorted(quant_checkpoints.items())))):
        got = r[name]
        assert all(got["quantized"]), "the experts were not kept quantized"
        ref_logits, ref_tokens = reference(quant_checkpoints[name], rank)
        err = (got["logits"] - ref_logits).abs().max().item()
        assert err <= 1e-4, f"rank {rank}: max abs logit error {err:.3g}"
        assert torch.equal(got["tokens"], ref_tokens), f"rank {rank}: tokens differ"
        for key, rows in got["reads"]:  # only this rank's experts were read
            m = re.search(r"\.experts\.(\d+)\.", key)
            local = set().union(*map(set, got["local"]))
            assert (int(m.group(1)) in local) if m else set(range(*rows)) <= local, key
        # expert memory against bf16's 2 bytes a weight: fp8 1 byte plus a 4-byte scale
        # per block (tiny blocks here: a release's 128 x 128 make it 0.5001); mxfp4 half
        # a byte plus a 1-byte scale per 32 weights
        block = json.loads(open(f"{quant_checkpoints[name]}/config.json").read())[
            "quantization_config"].get("weight_block_size", [1, 32])
        want = (0.5 + 1 / 32) / 2 if name.endswith("mxfp4") else \
            (1 + 4 / (block[0] * block[1])) / 2
        for held, bf16 in zip(got["expert_bytes"], got["bf16_bytes"], strict=True):
            assert held / bf16 == pytest.approx(want, rel=1e-9), (held, bf16)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_logits_against_transformers(quant_checkpoints, name):
    """bf16: the adapter families' logits are transformers' bit for bit (the experts
    dequantized to the weights transformers dequantizes, computed as the plain layer
    does); through the seam, within bf16 tolerance."""
    path = quant_checkpoints[name]
    model = from_pretrained(path, epmoe.single_process_state("cpu"), dtype="bfloat16")
    for rank in (0, 1):
        ids, _ = rank_inputs(rank)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        want = reference(path, rank, torch.bfloat16)[0]
        if name.startswith("glm4"):
            err = (got.float() - want.float()).abs().max().item()
            assert err <= 2e-2 * want.float().abs().max().item(), err
        else:
            assert torch.equal(got, want)


def test_unsupported_quantization_is_named(quant_checkpoints, tmp_path):
    import shutil

    shutil.copytree(quant_checkpoints["qwen3_moe_fp8"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quant_method 'awq' is not supported by epmoe "
                                         r"\(supported: fp8 \(block-scaled"):
        from_pretrained(tmp_path / "m", epmoe.single_process_state("cpu"))


def test_quantized_experts_rebalance(quant_checkpoints):
    """Redundant copies are read quantized from the checkpoint, and a rebalance moves
    the quantized blocks and scales: the outputs do not change."""
    per_rank = run_ranks(_rebalance_worker, 2, quant_checkpoints["qwen3_moe_fp8"],
                         deadline_s=300)
    for r in per_rank:
        assert torch.allclose(r["before"], r["after"], atol=1e-5, rtol=0)
    assert any(r["moved"] for r in per_rank)


def _rebalance_worker(path: str) -> dict:
    warnings.filterwarnings("ignore")
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    model = from_pretrained(path, state, dtype="float32",
                            moe_options=dict(num_redundant_experts=2, load_window=4))
    ids, _ = rank_inputs(state.rank)
    with model.epmoe.session(), torch.no_grad():
        before = model(input_ids=ids).logits
    loaded = [m.local_experts for m in model.epmoe.layers]
    model.epmoe.rebalance(min_gain=0.0)
    with model.epmoe.session(), torch.no_grad():
        after = model(input_ids=ids).logits
    return dict(before=before, after=after,
                moved=[m.local_experts for m in model.epmoe.layers] != loaded)


@pytest.mark.parametrize("name", ["qwen3_moe_fp8", "gpt_oss_mxfp4"])
def test_generate_on_the_serving_engine_keeps_experts_quantized(quant_checkpoints, name):
    """``python -m epmoe generate`` over 2 ranks (the serving engine) on a quantized
    checkpoint: greedy tokens equal transformers' on its dequantized load (fp32)."""
    from test_cli_generate import generate

    path = quant_checkpoints[name]
    prompts = [[5, 9, 17, 33, 2, 80], [7, 1, 250]]
    p = generate(2, "--model", path, "--max-new-tokens", "5", "--ignore-eos", "--force-cpu",
                 "--dtype", "float32",
                 *[a for ids in prompts for a in ("--prompt-ids", ",".join(map(str, ids)))])
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for line, ids in zip(lines, prompts, strict=True):
        want = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5,
                              do_sample=False)[0, len(ids):].tolist()
        assert line.endswith("-> " + ",".join(map(str, want))), (line, want)
