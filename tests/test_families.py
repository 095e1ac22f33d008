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

from hf_runs import expert_reads, logits_and_tokens, rank_inputs  # noqa: E402
from multiproc import run_ranks  # noqa: E402

import epmoe  # noqa: E402
from epmoe.hf import CheckpointError, from_pretrained  # noqa: E402
from epmoe.hf.seam import SeamExperts  # noqa: E402
from epmoe.hf.seam_load import model_class  # noqa: E402
from epmoe.hf.tiny_families import TINY_SEAM_FAMILIES, save_tiny_seam_checkpoint  # noqa: E402

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
        logits, tokens = logits_and_tokens(model, state.rank)
        seam = [m for m in model.modules() if isinstance(m, SeamExperts)]
        out[name] = dict(logits=logits, tokens=tokens, reads=expert_reads(model),
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
    return logits_and_tokens(model, rank)


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


# ------------------------------------------ what the seam families keep: balancing, training

def _capabilities_worker(dirs: dict[str, str]) -> dict:
    from epmoe.training import average_gradients

    warnings.filterwarnings("ignore")
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    out = {}
    ids, _ = rank_inputs(state.rank)
    for name in ("glm4_moe", "qwen3_vl_moe_hub"):
        # redundant experts (read from the checkpoint), load statistics, a rebalance
        model = from_pretrained(dirs[name], state, dtype="float32",
                                moe_options=dict(num_redundant_experts=2, load_window=4))
        with model.epmoe.session(), torch.no_grad():
            before = model(input_ids=ids).logits
        loaded = [layer.local_experts for layer in model.epmoe.layers]
        load = [layer.load.total().clone() for layer in model.epmoe.layers]
        model.epmoe.rebalance(min_gain=0.0)
        with model.epmoe.session(), torch.no_grad():
            after = model(input_ids=ids).logits
        moved = [layer.local_experts for layer in model.epmoe.layers] != loaded
        # a capacity: dropped pairs are counted, the rest still equal transformers' experts
        capped = from_pretrained(dirs[name], state, dtype="float32",
                                 moe_options=dict(capacity_factor=0.5))
        with capped.epmoe.session(), torch.no_grad():
            capped(input_ids=ids)
        dropped = sum(int(layer.dropped) for layer in capped.epmoe.layers)
        out[name] = dict(before=before, after=after, loaded=loaded, load=load, moved=moved,
                         dropped=dropped)
    # training: gradients through transformers' router and epmoe's experts
    model = from_pretrained(dirs["glm4_moe"], state, dtype="float32")
    model.train()
    with model.epmoe.session():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    average_gradients(model, state)
    local = {n: m.moe.local_experts for n, m in model.named_modules()
             if isinstance(m, SeamExperts)}
    out["grads"] = dict(loss=loss.detach(), local=local,
                        grads={n: p.grad for n, p in model.named_parameters()
                               if p.grad is not None})
    return out


@functools.cache
def capabilities(dirs: tuple[tuple[str, str], ...]) -> list[dict]:
    return run_ranks(_capabilities_worker, 2, dict(dirs), deadline_s=300)


@pytest.mark.parametrize("name", ["glm4_moe", "qwen3_vl_moe_hub"])
def test_redundant_experts_rebalance_and_capacity_through_the_seam(seam_checkpoints, name):
    per_rank = capabilities(tuple(sorted(seam_checkpoints.items())))
    for rank, r in enumerate(per_rank):
        got = r[name]
        ref_logits, _ = reference(seam_checkpoints[name], rank)
        assert (got["before"] - ref_logits).abs().max().item() <= 1e-4
        assert (got["after"] - ref_logits).abs().max().item() <= 1e-4
        assert all(len(ids) == len(got["loaded"][0]) for ids in got["loaded"])
        assert all(int(load.sum()) > 0 for load in got["load"])
        assert got["dropped"] > 0  # capacity 0.5: some pairs over it
    assert any(r[name]["moved"] for r in per_rank)  # the rebalance moved experts


def test_training_gradients_through_the_seam_match_transformers(seam_checkpoints):
    """EP=2, each rank its own sequences, average_gradients: every gradient equals that
    of transformers on one process for the mean of the two ranks' losses."""
    from transformers import AutoConfig

    path = seam_checkpoints["glm4_moe"]
    ranks = [r["grads"] for r in capabilities(tuple(sorted(seam_checkpoints.items())))]
    ref = model_class(AutoConfig.from_pretrained(path)).from_pretrained(path,
                                                                        dtype=torch.float32)
    ref.train()
    losses = [ref(input_ids=rank_inputs(r)[0], labels=rank_inputs(r)[0]).loss for r in range(2)]
    (sum(losses) / 2).backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for rank, r in enumerate(ranks):
        assert torch.allclose(r["loss"], losses[rank].detach(), rtol=1e-5)
        assert len(r["grads"]) == len(want)
        for n, g in r["grads"].items():
            if ".experts.moe." in n:
                block, leaf = n.rsplit(".moe.", 1)
                local = list(r["local"][block])
                w = {"w_gate_up": want[f"{block}.gate_up_proj"][local],
                     "w_down": want[f"{block}.down_proj"][local]}[leaf]
            else:
                w = want[n]
            err = (g - w).abs().max().item()
            assert err <= 1e-5 * max(w.abs().max().item(), 1e-6), f"rank {rank} {n}: {err:.3g}"


def test_balancing_of_epmoes_router_is_refused_with_the_models_own(seam_checkpoints):
    with pytest.raises(ValueError, match=r"router='given' routes with the model's own router: "
                                         r"\['score_correction_bias', 'bias_update_rate'\]"):
        from_pretrained(seam_checkpoints["glm4_moe"], epmoe.single_process_state("cpu"),
                        moe_options=dict(score_correction_bias=True, bias_update_rate=1e-3))


def test_save_pretrained_is_refused_by_name(seam_checkpoints, tmp_path):
    from epmoe.hf import save_pretrained

    state = epmoe.single_process_state("cpu")
    model = from_pretrained(seam_checkpoints["minimax_m2"], state)
    with pytest.raises(CheckpointError, match=r"model_type='minimax_m2' runs through "
                                              r"transformers' experts seam"):
        save_pretrained(model, tmp_path, state)


@pytest.mark.parametrize("name", ["qwen3_vl_moe_hub", "mistral4"])
def test_generate_on_the_serving_engine_over_two_ranks(seam_checkpoints, name):
    """``python -m epmoe generate`` (the serving engine: paged KV cache, continuous
    batching) on a seam family, 2 ranks: each prompt's greedy tokens equal transformers'."""
    from test_cli_generate import generate

    path = seam_checkpoints[name]
    prompts = [[5, 9, 17, 33, 2, 80], [7, 1, 250], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    p = generate(2, "--model", path, "--max-new-tokens", "5", "--ignore-eos", "--force-cpu",
                 "--dtype", "float32",
                 *[a for ids in prompts for a in ("--prompt-ids", ",".join(map(str, ids)))])
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == len(prompts), p.stdout
    from transformers import AutoConfig

    model = model_class(AutoConfig.from_pretrained(path)).from_pretrained(
        path, dtype=torch.float32).eval()
    for line, ids in zip(lines, prompts, strict=True):
        want = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5,
                              do_sample=False)[0, len(ids):].tolist()
        assert line.endswith("-> " + ",".join(map(str, want))), (line, want)


@pytest.mark.parametrize("name, kind", [("jamba", "linear_attention"),
                                        ("lfm2_moe", "conv"),
                                        ("deepseek_v32", "indexed_attention")])
def test_serving_refuses_layers_the_paged_cache_cannot_run_by_name(seam_checkpoints, name,
                                                                   kind):
    from transformers import AutoConfig

    from epmoe.serve.kv_cache import check_attention_only

    with pytest.raises(ValueError, match=rf"has \['{kind}'\] layers"):
        check_attention_only(AutoConfig.from_pretrained(seam_checkpoints[name]))
    check_attention_only(AutoConfig.from_pretrained(seam_checkpoints["qwen3_vl_moe"]))
