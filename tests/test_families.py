"""Every MoE family that runs through transformers' experts seam (epmoe.hf.seam), against
transformers itself: tiny random checkpoints written by transformers' save_pretrained,
loaded expert-parallel on 1, 2 and 3 ranks (one process group per world size, shared by
all the families), fp32 logits within 1e-4 and greedy tokens identical, the ranks asking
for different numbers of tokens (so some finish first and run dummy steps), each rank
reading only its own experts."""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import epmoe  # noqa: E402
from epmoe.hf import CheckpointError, from_pretrained  # noqa: E402
from epmoe.hf.seam import SeamExperts  # noqa: E402
from epmoe.hf.seam_load import model_class  # noqa: E402
from epmoe.hf.tiny_families import TINY_SEAM_FAMILIES, save_tiny_seam_checkpoint  # noqa: E402
from multiproc import run_ranks  # noqa: E402

from test_hf_models import rank_inputs  # noqa: E402

WORLDS = [1, 2, 3]
# qwen3_vl_moe_hub: Qwen3-VL-MoE's experts as its release stores them, [E, H, 2F] and
# [E, F, H] (transformers transposes them on load; its own save keeps its memory layout)
FAMILIES = sorted([*TINY_SEAM_FAMILIES, "qwen3_vl_moe_hub"])


@pytest.fixture(scope="session")
def seam_checkpoints(tmp_path_factory) -> dict[str, str]:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("seam")
    out = {f: str(save_tiny_seam_checkpoint(f, root / f, seed=3)) for f in TINY_SEAM_FAMILIES}
    hub = save_tiny_seam_checkpoint("qwen3_vl_moe", root / "qwen3_vl_moe_hub", seed=4)
    weights = load_file(hub / "model.safetensors")
    for k in [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weights[k] = weights[k].transpose(1, 2).contiguous()
    save_file(weights, str(hub / "model.safetensors"), metadata={"format": "pt"})
    out["qwen3_vl_moe_hub"] = str(hub)
    return out


def _worker(dirs: dict[str, str]) -> dict:
    warnings.filterwarnings("ignore")  # (transformers' notes on slow reference kernels)
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    out = {}
    for name, path in dirs.items():
        model = from_pretrained(path, state, dtype="float32")
        ids, new = rank_inputs(state.rank)
        with model.epmoe.session(), torch.no_grad():
            logits = model(input_ids=ids).logits
        tokens = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False)
        seam = [m for m in model.modules() if isinstance(m, SeamExperts)]
        out[name] = dict(logits=logits, tokens=tokens,
                         # expert reads: one tensor per expert, or rows of a stacked one
                         reads=[(k, rows) for k, rows in model.epmoe.reads
                                if rows is not None or re.search(r"\.experts\.\d+\.", k)],
                         local=[m.moe.local_experts for m in seam], seam_layers=len(seam),
                         forwards=[m.moe.forwards for m in seam],
                         dummy_steps=model.epmoe.dummy_steps)
    return out


@functools.cache
def results(world: int, dirs: tuple[tuple[str, str], ...]) -> list[dict]:
    return run_ranks(_worker, world, dict(dirs), deadline_s=600)


@functools.cache
def reference(path: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    model = model_class(config).from_pretrained(path, dtype=torch.float32).eval()
    ids, new = rank_inputs(rank)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits, model.generate(input_ids=ids, max_new_tokens=new, do_sample=False)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_greedy_tokens_match_transformers(seam_checkpoints, world, name):
    per_rank = results(world, tuple(sorted(seam_checkpoints.items())))
    for rank, r in enumerate(per_rank):
        got = r[name]
        assert got["seam_layers"] >= 1 and all(f > 0 for f in got["forwards"]), \
            "the experts did not run through epmoe"
        ref_logits, ref_tokens = reference(seam_checkpoints[name], rank)
        err = (got["logits"] - ref_logits).abs().max().item()
        assert err <= 1e-4, f"rank {rank}: max abs logit error {err:.3g}"
        assert torch.equal(got["tokens"], ref_tokens), f"rank {rank}: tokens differ"
    if world > 1:  # ranks asked for different numbers of tokens: early ones ran dummy steps
        assert any(r[name]["dummy_steps"] > 0 for r in per_rank)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_reads_only_its_own_experts(seam_checkpoints, world):
    for name in FAMILIES:
        for r in results(world, tuple(sorted(seam_checkpoints.items()))):
            got = r[name]
            local = set().union(*map(set, got["local"]))
            assert got["reads"], f"{name}: no expert tensor was read"
            for key, rows in got["reads"]:
                m = re.search(r"\.experts\.(\d+)\.", key)
                if m:  # one tensor per expert
                    assert rows is None and int(m.group(1)) in local, (name, key)
                else:  # stacked: a run of this rank's rows only
                    assert rows is not None and set(range(*rows)) <= local, (name, key, rows)
            # and no more than its own: per layer, (its experts) x (gate, up, down)
            per_layer = len(got["reads"]) / got["seam_layers"]
            assert per_layer <= 3 * len(got["local"][0]), (name, per_layer)


def test_models_without_seam_experts_are_refused_by_name(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"model_type='llama' has no experts module that "
                                              r"goes through transformers' experts seam"):
        from_pretrained(tmp_path, epmoe.single_process_state("cpu"))


def test_experts_epmoe_cannot_run_are_refused_by_name(tmp_path):
    """Experts without a gate (relu² experts of Nemotron-H) are named, not run wrongly."""
    import transformers
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_gate=False)
    class Ungated(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.empty(4, 8, 16))
            self.down_proj = torch.nn.Parameter(torch.empty(4, 16, 8))

    from epmoe.hf.seam import seam_layer

    config = transformers.Qwen3MoeConfig(hidden_size=16, num_experts=4, num_experts_per_tok=2)
    with pytest.raises(CheckpointError, match=r"experts without a gate \(has_gate=False\)"):
        seam_layer(Ungated(config), config, epmoe.single_process_state("cpu"), torch.float32,
                   {}, "layer 0")
