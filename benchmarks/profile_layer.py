"""Where a forward of the layer spends its time, by kind of operation (torch.profiler).

    torchrun --nproc_per_node=2 benchmarks/profile_layer.py [--tokens 2048] [--backend alltoall]

The Mixtral-like preset, bf16, on rank 0: the self CPU time of every operator,
summed into the layer's kinds of work, as a share of the whole forward. The
expert matrix products are the floor of the benchmark's efficiency; everything
else bounds it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import epmoe
from epmoe.benchmark import preset_config

KINDS = {  # kind: operator names (aten:: dropped)
    "matrix products": {"mm", "_grouped_mm", "addmm", "bmm"},
    "activation (silu, mul)": {"silu", "silu_", "mul", "mul_", "gelu"},
    "weighted row sums": {"index_add_", "index_add", "scatter_add_", "fill_", "zero_"},
    "gathers and copies": {"index_select", "copy_", "_to_copy", "cat", "index", "index_copy"},
    "collectives (incl. waiting for the peer)": set(),
}


def kind_of(name: str) -> str:
    short = name.removeprefix("aten::")
    if "c10d" in name or "Exchange" in name or "AllToAll" in name or "barrier" in name:
        return "collectives (incl. waiting for the peer)"
    for kind, names in KINDS.items():
        if short in names:
            return kind
    return "other (routing, index planning, Python)"


def main(tokens: int = 2048, backend: str = "alltoall", reps: int = 5,
         json_out: str | None = None) -> dict | None:
    state = epmoe.init_distributed(force_cpu=True)
    cfg = preset_config("mixtral", "bfloat16", backend, tokens)
    layer = epmoe.ExpertParallelMoE(cfg, state)
    x = torch.randn(tokens, 1024, generator=torch.Generator().manual_seed(state.rank))
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(reps):
                layer(x)
            wall = 1e3 * (time.perf_counter() - t0) / reps
    shares: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::") or "c10d" in e.key or "Exchange" in e.key:
            k = kind_of(e.key)
            shares[k] = shares.get(k, 0.0) + e.self_cpu_time_total / 1e3 / reps
    ops = sum(shares.values())
    shares["outside any operator (waiting for the peer, Python)"] = max(wall - ops, 0.0)
    total = sum(shares.values())
    mine = dict(rank=state.rank, ms_per_forward=total,
                shares={k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])})
    everyone = [None] * state.world_size
    dist.all_gather_object(everyone, mine)
    out = dict(tokens=tokens, backend=backend, ranks=everyone)
    if state.rank == 0:
        for r in everyone:
            print(f"{backend}, {tokens} tokens per rank, bf16, rank {r['rank']}: "
                  f"{r['ms_per_forward']:.1f} ms per forward (under the profiler)")
            for k, v in r["shares"].items():
                print(f"  {100 * v:5.1f}%  {k}")
        if json_out:
            with open(json_out, "w") as f:
                json.dump(out, f, indent=1)
    epmoe.destroy_distributed()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--backend", default="alltoall")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", dest="json_out", default=None)
    main(**vars(p.parse_args()))
