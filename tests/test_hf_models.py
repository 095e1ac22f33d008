"""Hugging Face checkpoints served expert-parallel, against transformers on one process.

Tiny random checkpoints of every family are written with ``save_pretrained``
(plus a sharded one and one with stacked expert tensors). For EP = 1, 2, 3,
each rank loads with ``epmoe.from_pretrained``, runs its own prompt (lengths,
batch sizes and numbers of new tokens differ by rank) and must give the
logits (fp32, max abs error <= 1e-4) and greedy tokens of transformers.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hf_runs import expert_reads, logits_and_tokens, rank_inputs
from multiproc import run_ranks

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import epmoe  # noqa: E402
from epmoe.hf import CheckpointError, from_pretrained  # noqa: E402
from epmoe.hf.tiny import TINY_FAMILIES, save_tiny_checkpoint  # noqa: E402

WORLDS = [1, 2, 3]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    out = {f: str(save_tiny_checkpoint(f, root / f, seed=3)) for f in TINY_FAMILIES}
    out["mixtral_sharded"] = str(save_tiny_checkpoint("mixtral", root / "sharded", seed=4,
                                                      max_shard_size="150KB"))
    # transformers 5's in-memory layout: experts stacked as gate_up_proj [E, 2F, H]
    stacked = save_tiny_checkpoint("qwen3_moe", root / "stacked", seed=5)
    model = transformers.AutoModelForCausalLM.from_pretrained(stacked, dtype=torch.float32)
    (stacked / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(stacked / "model.safetensors"), metadata={"format": "pt"})
    out["qwen3_stacked"] = str(stacked)
    # variants: dense layers among the MoE ones, tied embeddings, other routing switches
    variants = {
        "qwen2_sparse_step": ("qwen2_moe", dict(decoder_sparse_step=2, norm_topk_prob=True,
                                                tie_word_embeddings=True)),
        "qwen3_mlp_only": ("qwen3_moe", dict(mlp_only_layers=[0], norm_topk_prob=False)),
        "deepseek_v3_ungrouped": ("deepseek_v3", dict(n_group=1, topk_group=1,
                                                      norm_topk_prob=False,
                                                      first_k_dense_replace=2,
                                                      n_shared_experts=2)),
        "mixtral_top1_tied": ("mixtral", dict(num_experts_per_tok=1, tie_word_embeddings=True)),
    }
    for name, (family, overrides) in variants.items():
        out[name] = str(save_tiny_checkpoint(family, root / name, seed=6, **overrides))
    return out


def _worker(dirs: dict[str, str]) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    out = {}
    for name, path in dirs.items():
        model = from_pretrained(path, state, dtype="float32")
        logits, tokens = logits_and_tokens(model, state.rank)
        out[name] = dict(logits=logits, tokens=tokens, reads=expert_reads(model),
                         local=model.epmoe.layers[0].local_experts,
                         dummy_steps=model.epmoe.dummy_steps)
    return out


@functools.cache
def results(world: int, dirs: tuple[tuple[str, str], ...]) -> list[dict]:
    return run_ranks(_worker, world, dict(dirs), deadline_s=600)


@functools.cache
def reference(path: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return logits_and_tokens(model, rank)


NAMES = [*TINY_FAMILIES, "mixtral_sharded", "qwen3_stacked", "qwen2_sparse_step",
         "qwen3_mlp_only", "deepseek_v3_ungrouped", "mixtral_top1_tied"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_tokens_match_transformers(checkpoints, world, name):
    per_rank = results(world, tuple(sorted(checkpoints.items())))
    for rank, r in enumerate(per_rank):
        ref_logits, ref_tokens = reference(checkpoints[name], rank)
        err = (r[name]["logits"] - ref_logits).abs().max().item()
        assert err <= 1e-4, f"rank {rank}: max abs logit error {err:.3g}"
        assert torch.equal(r[name]["tokens"], ref_tokens), f"rank {rank}: tokens differ"
    if world > 1:  # ranks asked for different numbers of tokens: early ones ran dummy steps
        assert any(r[name]["dummy_steps"] > 0 for r in per_rank)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "qwen3_stacked"])
def test_each_rank_reads_only_its_own_experts(checkpoints, world, name):
    for r in results(world, tuple(sorted(checkpoints.items())))[:world]:
        local = set(r[name]["local"])
        assert r[name]["reads"], "no expert tensor was read"
        for key, rows in r[name]["reads"]:
            m = re.search(r"\.experts\.(\d+)\.", key)
            if m:  # one tensor per expert
                assert rows is None and int(m.group(1)) in local, key
            else:  # stacked: a run of this rank's rows only
                assert rows is not None and set(range(*rows)) <= local, (key, rows)


# --------------------------------------------------------------- redundant experts

REDUNDANT = {"mixtral": 2, "gpt_oss": 2, "deepseek_v3": 4}  # E + R divides by 2 ranks


def _redundant_worker(dirs: dict[str, str]) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    out = {}
    for name, R in REDUNDANT.items():
        model = from_pretrained(dirs[name], state, dtype="float32",
                                moe_options=dict(num_redundant_experts=R, load_window=4,
                                                 batch_invariant=True))
        layers = model.epmoe.layers
        loaded = [layer.local_experts for layer in layers]
        ids, _ = rank_inputs(state.rank)
        with model.epmoe.session(), torch.no_grad():
            before = model(ids).logits
        reports = model.epmoe.rebalance(min_gain=0.0)  # (short prompts: move even for little)
        with model.epmoe.session(), torch.no_grad():
            after = model(ids).logits
        reads = [(k, rows) for k, rows in model.epmoe.reads if ".experts." in k]
        out[name] = dict(before=before, after=after, reports=reports, reads=reads,
                         loaded=loaded, after_local=[layer.local_experts for layer in layers])
    return out


def _experts_read(reads: list, layer: int) -> set[int]:
    got: set[int] = set()
    for key, rows in reads:
        if f"layers.{layer}." not in key:
            continue
        m = re.search(r"\.experts\.(\d+)\.", key)
        got |= {int(m.group(1))} if m else set(range(*rows))
    return got


def test_redundant_experts_load_from_the_checkpoint_and_rebalance(checkpoints):
    dirs = {n: checkpoints[n] for n in REDUNDANT}
    per_rank = run_ranks(_redundant_worker, 2, dirs, deadline_s=300)
    for name, R in REDUNDANT.items():
        moved = 0
        for rank, r in enumerate(per_rank):
            got = r[name]
            ref_logits, _ = reference(checkpoints[name], rank)
            assert (got["before"] - ref_logits).abs().max().item() <= 1e-4, (name, rank)
            assert torch.equal(got["before"], got["after"]), f"{name}: rebalance changed logits"
            first_moe = 1 if name == "deepseek_v3" else 0  # (a dense first layer)
            for i, local in enumerate(got["loaded"]):
                # every slot, copies included, was filled from the checkpoint: its rows read
                assert len(local) == len(got["after_local"][i])
                assert set(local) == _experts_read(got["reads"], first_moe + i), (name, rank, i)
            moved += sum(rep.changed_rows for rep in got["reports"])
        assert moved > 0, f"{name}: the rebalance moved nothing"
        # R more slots than experts over the group: the copies, each read from the file
        assert sum(len(r[name]["loaded"][0]) for r in per_rank) == \
            len(set().union(*(r[name]["loaded"][0] for r in per_rank))) + R


# --------------------------------------------------------------- bad checkpoints


def _edit(src: str, dst, edit) -> str:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    edit(tensors)
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_missing_expert_tensor_is_named(checkpoints, tmp_path):
    key = "model.layers.1.block_sparse_moe.experts.4.w3.weight"
    path = _edit(checkpoints["mixtral"], tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=re.escape(f"has no tensor '{key}'")):
        from_pretrained(path, epmoe.single_process_state("cpu"))


def test_wrongly_shaped_tensors_are_named(checkpoints, tmp_path):
    key = "model.layers.2.mlp.experts.gate_up_proj"

    def shrink(t):
        t[key] = t[key][:, :-1].contiguous()

    path = _edit(checkpoints["gpt_oss"], tmp_path / "g", shrink)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}'") + r".* has shape "
                       r"\(6, 63, 96\), expected \(6, 64, 96\)"):
        from_pretrained(path, epmoe.single_process_state("cpu"))
    key2 = "model.layers.0.self_attn.k_proj.weight"  # [32, 64]: transposed, [64, 32]
    path2 = _edit(checkpoints["olmoe"], tmp_path / "o",
                  lambda t: t.update({key2: t[key2].T.contiguous()}))
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key2}'") + r".* has shape "
                       r"\(64, 32\), expected \(32, 64\)"):
        from_pretrained(path2, epmoe.single_process_state("cpu"))


def test_unsupported_or_missing_model(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(tmp_path, epmoe.single_process_state("cpu"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"holds neither model.safetensors nor "
                                              r"model.safetensors.index.json"):
        from_pretrained(tmp_path, epmoe.single_process_state("cpu"))
    # (a dense model with weights: tests/test_families.py)


def _broken_worker(path: str) -> str:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    try:
        from_pretrained(path, state)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def test_a_broken_expert_fails_on_every_rank(checkpoints, tmp_path):
    """Expert 5 lives on rank 1 only, yet rank 0 fails too (and nothing hangs)."""
    key = "model.layers.0.mlp.experts.5.down_proj.weight"
    path = _edit(checkpoints["olmoe"], tmp_path / "b", lambda t: t.pop(key))
    out = run_ranks(_broken_worker, 2, path, deadline_s=120)
    assert all(key in text for text in out), out


def _per_rank_worker(paths: list[str]) -> str:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    try:
        from_pretrained(paths[state.rank], state)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def test_a_checkpoint_broken_on_one_host_only_fails_on_every_rank(checkpoints, tmp_path):
    """Rank 1 reads another directory (another host's disk): missing, or lacking a tensor.
    It raises its own error, rank 0 one naming it; neither waits for a timeout."""
    good = checkpoints["olmoe"]
    r0, r1 = run_ranks(_per_rank_worker, 2, [good, str(tmp_path / "absent")], deadline_s=120)
    assert "has no config.json" in r1, r1
    assert r0.startswith(f"rank 1 failed opening its checkpoint: CheckpointError: "
                         f"{tmp_path / 'absent'} has no config.json") \
        and "every rank stopped here" in r0, r0
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    broken = _edit(good, tmp_path / "b1", lambda t: t.pop(key))
    r0, r1 = run_ranks(_per_rank_worker, 2, [good, broken], deadline_s=120)
    assert f"has no tensor '{key}'" in r1, r1
    assert r0.startswith("rank 1 failed loading its checkpoint: CheckpointError: ") \
        and key in r0, r0


def fp16_product_bits_follow_weight_layout() -> bool:
    """Whether an fp16 matrix product on this CPU gives other bits for ``x @ W`` with ``W``
    stored ``[K, N]`` than with the same numbers stored ``[N, K]``.

    PyTorch multiplies fp16 matrices with oneDNN only on CPUs with fp16 matrix units
    (AVX512-FP16 or AMX-FP16, e.g. Intel Sapphire Rapids). Elsewhere (AMD Zen 4/5:
    AVX-512 BF16 but no FP16) it falls back to its own kernels, which add up the fp32
    products in an order that depends on the weight's layout. bf16 goes through
    oneDNN on both kinds of CPU, so bf16 bits never depend on it.
    """
    gen = torch.Generator().manual_seed(0)
    for rows in range(1, 17):  # the fallback's order depends on the shape too
        x = torch.randn(rows, 64, generator=gen).half()
        w_KN = torch.randn(64, 96, generator=gen).half()
        if not torch.equal(x @ w_KN, x @ w_KN.t().contiguous().t()):
            return True
    return False


def store_experts_as_nn_linear(hf_model) -> None:
    """Give transformers' experts the same numbers in epmoe's memory layout: ``[E, H, 2F]``
    views of ``[E, 2F, H]`` storage (epmoe keeps experts in ``nn.Linear`` orientation).
    Only GPT-OSS stores its experts ``[E, H, 2F]``; the other families already match."""
    for module in hf_model.modules():
        if getattr(module, "is_transposed", False):  # transformers' experts interface flag
            for p in (module.gate_up_proj, module.down_proj):
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_low_precision_logits_are_transformers_bit_for_bit(checkpoints, name, dtype):
    """On one process, bf16 and fp16 logits equal transformers' exactly: each family
    weighs and sums its experts as transformers does (MoEConfig.weigh_in_fp32), and
    DeepSeek's router stays fp32 (transformers' _keep_in_fp32_modules_strict).

    One condition, made explicit: where fp16 product bits follow the weight's layout
    (CPUs without fp16 matrix units, see fp16_product_bits_follow_weight_layout),
    GPT-OSS's experts, stored ``[E, H, 2F]`` by transformers and ``[E, 2F, H]`` by epmoe,
    round differently in the last place. There transformers' experts get epmoe's
    layout (the same numbers) first, and the logits must then be equal bit for bit.
    """
    path = checkpoints[name]
    model = from_pretrained(path, epmoe.single_process_state("cpu"), dtype=dtype)
    moe = model.epmoe.layers[0]
    assert moe.w_gate.dtype == dtype and model.get_decoder().embed_tokens.weight.dtype == dtype
    assert moe.router_weight.dtype == (torch.float32 if name.startswith("deepseek") else dtype)
    ids, _ = rank_inputs(1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if dtype == torch.float16 and fp16_product_bits_follow_weight_layout():
        store_experts_as_nn_linear(hf)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf(ids).logits)


def _bad_token_worker(path: str) -> dict:
    """Rank 1 passes a token id outside the vocabulary: it fails in the embedding,
    after its step began; rank 0 must still finish, with the right tokens."""
    import time

    state = epmoe.init_distributed(force_cpu=True, timeout_s=20)
    model = from_pretrained(path, state, dtype="float32")
    ids, new = rank_inputs(0)
    if state.rank == 1:
        ids = ids.clone()
        ids[0, 2] = 10_000
    t0 = time.monotonic()
    try:
        tokens = model.generate(ids, max_new_tokens=new, do_sample=False)
        error = None
    except IndexError as e:
        tokens, error = None, str(e)
    return dict(tokens=tokens, error=error, seconds=time.monotonic() - t0)


def test_a_failing_rank_lets_the_others_finish(checkpoints):
    out = run_ranks(_bad_token_worker, 2, checkpoints["mixtral"], deadline_s=120)
    assert out[1]["error"] and out[1]["tokens"] is None
    assert out[0]["error"] is None
    assert torch.equal(out[0]["tokens"], reference(checkpoints["mixtral"], 0)[1])
    assert max(o["seconds"] for o in out) < 15, "a rank waited for a collective timeout"


def test_misquantised_checkpoints_are_refused(checkpoints, tmp_path):
    """(FP8 and MXFP4 checkpoints load: tests/test_quant_models.py.) A config that says
    fp8 over unquantized experts, and an fp8 tensor in an unquantized checkpoint, are
    named."""
    import json
    import shutil

    q = tmp_path / "q"
    shutil.copytree(checkpoints["deepseek_v3"], q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"expert weight 'model.layers.1.mlp.experts.0."
                                              r"gate_proj.weight' is F32, not fp8"):
        from_pretrained(q, epmoe.single_process_state("cpu"))
    key = "model.layers.0.self_attn.o_proj.weight"
    path = _edit(checkpoints["olmoe"], tmp_path / "f8",
                 lambda t: t.update({key: t[key].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}'") + r".* is F8_E4M3"):
        from_pretrained(path, epmoe.single_process_state("cpu"))


def test_router_logits_are_refused_clearly_and_fp16_keeps_fp32_norms(checkpoints, tmp_path):
    import json
    import shutil

    d = tmp_path / "r"
    shutil.copytree(checkpoints["qwen3_moe"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["output_router_logits"] = True  # a training setting: ignored when serving
    (d / "config.json").write_text(json.dumps(cfg))
    model = from_pretrained(d, epmoe.single_process_state("cpu"), dtype="float32")
    ids, _ = rank_inputs(0)
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False),
                       reference(checkpoints["qwen3_moe"], 0)[1][:, : ids.shape[1] + 3])
    with pytest.raises(ValueError, match="do not return router logits"):
        model(ids, output_router_logits=True)
    gpt = from_pretrained(checkpoints["gpt_oss"], epmoe.single_process_state("cpu"),
                          dtype="float16")
    dec = gpt.get_decoder()
    assert dec.norm.weight.dtype == torch.float32  # transformers' _keep_in_fp32_modules
    assert dec.layers[0].input_layernorm.weight.dtype == torch.float32
    assert dec.layers[0].self_attn.q_proj.weight.dtype == torch.float16


# --------------------------------------------------------------- training gradients


def _grad_worker(path: str) -> dict:
    from epmoe.training import average_gradients

    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    model = from_pretrained(path, state, dtype="float32")
    model.train()
    ids, _ = rank_inputs(state.rank)
    with model.epmoe.session():
        loss = model(ids, labels=ids).loss
    loss.backward()
    average_gradients(model, state)
    local = {n: layer.local_experts for n, layer in model.named_modules()
             if isinstance(layer, epmoe.ExpertParallelMoE)}
    return dict(loss=loss.detach(), local=local,
                grads={n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def test_whole_model_gradients_match_transformers_backward(checkpoints):
    """EP=2, each rank its own sequences, average_gradients: every gradient equals that
    of transformers on one process for the mean of the two ranks' losses."""
    path = checkpoints["mixtral"]
    ranks = run_ranks(_grad_worker, 2, path, deadline_s=300)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref.train()
    losses = []
    for rank in range(2):
        ids, _ = rank_inputs(rank)
        losses.append(ref(ids, labels=ids).loss)
    (sum(losses) / 2).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    for rank, r in enumerate(ranks):
        assert torch.allclose(r["loss"], losses[rank].detach(), rtol=1e-5)
        assert len(r["grads"]) == len(want)
        for n, g in r["grads"].items():
            if ".mlp.moe." in n:
                block, leaf = n.rsplit(".moe.", 1)
                local = list(r["local"][block + ".moe"])
                w = {"router_weight": want[f"{block}.gate.weight"],
                     "w_gate_up": want[f"{block}.experts.gate_up_proj"][local],
                     "w_down": want[f"{block}.experts.down_proj"][local]}[leaf]
            else:
                w = want[n]
            err = (g - w).abs().max().item()
            assert err <= 1e-5 * max(w.abs().max().item(), 1e-6), f"rank {rank} {n}: {err:.3g}"
