"""``python -m epmoe bench`` under torchrun: consistent figures, JSON and PNG written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_two_ranks_json_and_plot(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "epmoe", "bench", "--preset", "mixtral", "--mode", "decode", "--tokens", "3",
           "--dtype", "float32", "--backend", "alltoall", "--backend", "low_latency",
           "--backend", "allgather_reducescatter", "--reps", "2", "--json", str(out),
           "--plot", str(png), "--force-cpu"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["ranks"] == 2 and png.stat().st_size > 1000
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"alltoall", "low_latency", "allgather_reducescatter"}
    for be, r in rows.items():
        assert r["tokens_per_s"] > 0 and 0 < r["efficiency"] and r["floor_ms"] > 0
        assert len(r["per_rank"]) == 2 and r["imbalance"] >= 1.0
        assert r["remote_token_bytes"] >= r["min_token_bytes"] > 0, be
        # every rank computed what it received: 2 ranks x 3 tokens x top-2 pairs
        assert sum(x["pairs"] for x in r["per_rank"]) == 2 * 3 * 2
    assert rows["alltoall"]["remote_token_bytes"] == rows["alltoall"]["min_token_bytes"]
    # fixed buffers: 3 rows to the other rank whatever the routing
    H = 1024
    assert all(x["remote_token_bytes"] == 3 * H * 4 for x in rows["low_latency"]["per_rank"])
    assert "mixtral  decode" in p.stdout


def test_bench_rejects_bad_input():
    p = subprocess.run([sys.executable, "-m", "epmoe", "bench", "--reps", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--reps must be >= 1" in p.stderr
