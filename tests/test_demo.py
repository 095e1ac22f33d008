"""The demo, run as the README says (torchrun, --force-cpu), and its FAIL path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import epmoe

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "demo.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_demo_two_ranks_force_cpu():
    p = torchrun(2, "--force-cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for step in ("Expert map", "Step 1 - router", "Step 2 - dispatch", "Step 3 - experts",
                 "Step 4 - combine", "Memory"):
        assert step in out
    assert "rank 0: experts 0, 1, 2, 3" in out and "rank 1: experts 4, 5, 6, 7" in out
    assert "rank 0 token 0 -> Expert " in out
    assert "full replica: 0.75 MiB -> 2.00x less" in out
    assert out.count("-> PASS") == 1 and "FAIL" not in out  # printed once, by rank 0


@pytest.mark.parametrize("nproc,args", [
    (1, []),
    (3, ["--experts", "7", "--top-k", "3", "--placement", "round_robin"]),
    (4, ["--dtype", "bfloat16", "--tokens", "40"]),
])
def test_demo_other_sizes(nproc, args):
    p = torchrun(nproc, "--force-cpu", *args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "-> PASS" in p.stdout


def test_demo_rejects_bad_options():
    p = subprocess.run([sys.executable, "demo.py", "--top-k", "9"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    assert "top_k=9 must be <= num_experts=8" in p.stderr and "Traceback" not in p.stderr


def test_check_fails_on_a_wrong_output(capsys):
    import demo

    cfg = epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4)
    weights = epmoe.full_weights(cfg)
    x = torch.randn(5, 8)
    y = epmoe.reference_moe(x, *weights, cfg)
    assert demo.check(cfg, x, y, weights)
    y[2, 3] += 1e-3
    assert not demo.check(cfg, x, y, weights)
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("nproc", [2, 3])
def test_demo_compare_prints_ep_beside_tp(nproc):
    p = torchrun(nproc, "--force-cpu", "--compare", "--prefill-tokens", "64", "--reps", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "EP beside TP on the same tokens" in out and "-> PASS" in out
    rows = {line.split("  ")[0]: line for line in out.splitlines()
            if line.startswith(("EP  ", "TP, own tokens  ", "TP, replicated  "))}
    assert set(rows) == {"EP", "TP, own tokens", "TP, replicated"}, out
    assert "3: 3 all-to-all" in rows["EP"]  # counts, rows with their routing, combine
    assert "2: 1 all-gather, 1 all-reduce" in rows["TP, replicated"]
    assert "F 0-" in rows["TP, own tokens"] and "experts, whole" in rows["EP"]
    assert all("(ok)" in row for row in rows.values())
