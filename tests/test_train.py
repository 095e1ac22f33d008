"""Training end to end: ``save_pretrained`` (each rank its experts, loadable at any EP size)
and ``python -m epmoe train`` under torchrun (loss falls, exact resume, clear refusals)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks

transformers = pytest.importorskip("transformers")

import epmoe  # noqa: E402
from epmoe.hf.checkpoint import INDEX, CheckpointReader  # noqa: E402
from epmoe.hf.saving import DENSE_FILE, expert_file, save_pretrained  # noqa: E402
from epmoe.hf.tiny import save_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 77, 111, 69, 33]])


def _save_worker(src: str, dst: str, options: dict) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    model = epmoe.from_pretrained(src, state, moe_options=options)
    with torch.no_grad():  # a trained bias, not the zeros it starts from
        for layer in model.epmoe.layers:
            if layer.config.score_correction_bias:
                E = layer.config.num_experts
                layer.score_correction_bias.copy_(torch.linspace(-0.2, 0.3, E))
    save_pretrained(model, dst, state)
    with torch.no_grad(), model.epmoe.session():
        logits = model(IDS).logits
    return dict(logits=logits, local=[layer.local_experts for layer in model.epmoe.layers])


def _load_worker(path: str) -> torch.Tensor:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    model = epmoe.from_pretrained(path, state)
    with torch.no_grad(), model.epmoe.session():
        return model(IDS).logits


@pytest.mark.parametrize("family,options,world", [
    ("mixtral", {}, 3), ("qwen2_moe", {}, 0), ("deepseek_v3", {}, 4),
    ("mixtral", dict(score_correction_bias=True), 0),  # bias balancing's bias, saved and read
])
def test_save_pretrained_each_rank_its_experts_loads_at_any_size(tmp_path, family, options,
                                                                 world):
    """Saved on 2 ranks; loaded by transformers, by epmoe on one process and on ``world``."""
    src = save_tiny_checkpoint(family, tmp_path / "src", seed=7)
    dst = tmp_path / "saved"
    saved = run_ranks(_save_worker, 2, str(src), str(dst), options, deadline_s=240)
    index = json.loads((dst / INDEX).read_text())["weight_map"]
    experts = {n: f for n, f in index.items() if ".experts." in n}
    assert experts and set(index.values()) == {DENSE_FILE, expert_file(0, 2),
                                               expert_file(1, 2)}
    for name, file in experts.items():  # each expert in the file of the rank that holds it
        layer, e = int(name.split(".")[2]), int(name.split(".experts.")[1].split(".")[0])
        moe_index = sorted({int(n.split(".")[2]) for n in experts}).index(layer)
        owner = next(r for r in range(2) if e in saved[r]["local"][moe_index])
        assert file == expert_file(owner, 2), name
    assert all(f == DENSE_FILE for n, f in index.items() if n not in experts)
    assert len(CheckpointReader(dst).keys()) == len(index)
    want = saved[0]["logits"]
    if not options:  # nothing changed: transformers reads the saved checkpoint as it is
        ref = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
        with torch.no_grad():
            assert torch.allclose(ref(IDS).logits, want, atol=1e-4, rtol=1e-4)
    one = epmoe.from_pretrained(dst, epmoe.single_process_state())
    with torch.no_grad():
        assert torch.allclose(one(IDS).logits, want, atol=1e-5, rtol=1e-5)
    for got in run_ranks(_load_worker, world, str(dst), deadline_s=240) if world else []:
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def train(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "-m", "epmoe", "train", "--force-cpu", "--no-progress",
           "--timeout", "60", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


BALANCING = ("--aux-loss-coef", "0.01", "--z-loss-coef", "0.001", "--bias-update-rate", "0.01")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "a"
    p = train(2, "--out", str(out), "--steps", "8", "--save-every", "4", *BALANCING)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "loss" in p.stdout and "MaxVio" in p.stdout
    return out


def test_train_two_ranks_loss_falls_and_writes_checkpoints_plot(run_a):
    history = json.loads((run_a / "history.json").read_text())
    assert [r["step"] for r in history] == list(range(1, 9))
    assert history[-1]["loss"] < history[0]["loss"] - 0.5  # from ln(259) = 5.56
    for r in history:  # every step's group-wide tokens per expert: 2 ranks x 8 x 64 x top-2
        assert len(r["load"]) == 3 and all(sum(c) == 2 * 8 * 64 * 2 for c in r["load"])
        assert r["aux"] > 0 and r["grad_norm"] > 0
    assert (run_a / "train.png").stat().st_size > 10_000
    ckpt = run_a / "checkpoints" / "step-000004"
    for name in (INDEX, DENSE_FILE, expert_file(0, 2), expert_file(1, 2),
                 "optimizer-dense.safetensors", "optimizer-experts-00001-of-00002.safetensors",
                 "optimizer-experts-00002-of-00002.safetensors", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    # The trained model loads on one process, bias included, and generates.
    p = subprocess.run([sys.executable, "-m", "epmoe", "generate", "--model",
                        str(run_a / "checkpoints" / "step-000008"), "--prompt", "12+7=",
                        "--max-new-tokens", "3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_train_resumes_with_identical_losses(run_a, tmp_path):
    out = tmp_path / "b"
    # Further than the first run: its schedule (8 steps) goes on, at its final rate.
    p = train(2, "--out", str(out), "--steps", "10", "--resume",
              str(run_a / "checkpoints" / "step-000004"), *BALANCING)
    assert p.returncode == 0, p.stdout + p.stderr
    a = json.loads((run_a / "history.json").read_text())
    b = json.loads((out / "history.json").read_text())
    assert b[:8] == a  # every step's loss, aux, gradient norm and load, bit for bit
    assert [r["step"] for r in b[8:]] == [9, 10] and b[9]["lr"] == a[7]["lr"]


def test_train_refuses_a_different_run_or_world(run_a, tmp_path):
    ckpt = str(run_a / "checkpoints" / "step-000004")
    p = train(2, "--out", str(tmp_path / "c"), "--steps", "8", "--resume", ckpt,
              "--lr", "0.01", *BALANCING)
    # (the ranks leave with 2; torchrun itself then exits 1)
    assert p.returncode != 0 and "arguments differ" in p.stderr and "'lr'" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "epmoe", "train", "--out", str(tmp_path / "d"),
                        "--steps", "8", "--resume", ckpt, *BALANCING], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "saved on 2 rank(s)" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "epmoe", "train", "--out", str(tmp_path / "e"),
                        "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no finished checkpoint" in p.stderr, p.stderr
