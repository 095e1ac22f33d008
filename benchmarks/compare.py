"""epmoe beside its peers, same run, same cores, same dtype, same tokens.

    torchrun --nproc_per_node=2 benchmarks/compare.py --json out.json [--reps 15]

The Mixtral-like preset (H=1024, F=2048, E=8, top-2), bf16, prefill (2048
tokens per rank) and decode (8 tokens per rank). Each rank holds different
tokens. In the same processes, forwards interleaved, each after a barrier:

* epmoe with each dispatch backend;
* transformers 5's own expert parallelism (``apply_expert_parallelism``,
  ``all_to_all``; its ``grouped_mm`` and ``eager`` experts), see
  ``peers/transformers_moe.py``;
* torchtitan's MoE with its all-to-all token dispatcher, when installed
  (``peers/torchtitan_moe.py``);
* transformers' MoE block on one process with 2 threads (``eager`` and
  ``grouped_mm``), on rank 0, over both ranks' tokens, while rank 1 waits;
* the floor (epmoe's expert products alone, the same rows) and two empty
  all-to-alls.

Every peer's output is checked against the fp32 reference (as epmoe's) before
it is timed; a peer that fails the check is reported, not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import epmoe
from epmoe.benchmark import _empty_a2a, _floor, _floor_grouped, preset_config, slowest_rank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import torchtitan_moe, transformers_moe  # noqa: E402

BACKENDS = ("alltoall", "allgather_reducescatter", "low_latency")


def build(cfg_tokens: int, state, weights):
    """Every contender for one token count: name -> (forward, runs_on_rank_0_only)."""
    H, Fi, E, k = 1024, 2048, 8, 2
    out, notes = {}, {}
    for be in BACKENDS:
        cfg = preset_config("mixtral", "bfloat16", be, cfg_tokens)
        layer = epmoe.ExpertParallelMoE(cfg, state, seed=None)
        layer.load_full_weights(**weights)
        out[f"epmoe {be}"] = (layer, False)
    for impl in ("grouped_mm", "eager"):
        try:
            out[f"transformers EP ({impl})"] = (transformers_moe.make_transformers_ep(
                H, Fi, E, k, torch.bfloat16, weights, state.rank, state.world_size,
                implementation=impl), False)
        except Exception as e:  # noqa: BLE001 (reported, not fatal)
            notes[f"transformers EP ({impl})"] = f"{type(e).__name__}: {e}"
    reason = torchtitan_moe.available()
    if reason is None:
        out["torchtitan EP"] = (torchtitan_moe.make_torchtitan_ep(
            H, Fi, E, k, torch.bfloat16, weights, state.rank, state.world_size), False)
    else:
        notes["torchtitan EP"] = reason
    if state.rank == 0:
        for impl in ("eager", "grouped_mm"):
            out[f"transformers block, 1 process ({impl})"] = (
                transformers_moe.make_transformers_block(H, Fi, E, k, torch.bfloat16, weights,
                                                         impl), True)
    else:  # rank 1 waits while rank 0 runs the one-process block
        for impl in ("eager", "grouped_mm"):
            out[f"transformers block, 1 process ({impl})"] = (None, True)
    return out, notes


@torch.no_grad()
def measure(tokens: int, reps: int, state) -> dict:
    cfg = preset_config("mixtral", "bfloat16", "alltoall", tokens)
    router, gate, up, down = epmoe.full_weights(cfg, seed=1)
    weights = dict(router_weight=router, w_gate=gate, w_up=up, w_down=down)
    gen = torch.Generator().manual_seed(100 + state.rank)
    x = torch.randn(tokens, 1024, generator=gen).to(torch.bfloat16)
    x_all, splits = epmoe.all_gather_v(x, state.ep_group)  # for the one-process peer
    contenders, notes = build(tokens, state, weights)

    # Check every contender's output against the reference before timing it.
    checks, ok = {}, {}
    for name, (fn, rank0_only) in contenders.items():
        if rank0_only:
            y = fn(x_all) if fn is not None else None
            xs, ys, sp = x_all, y, splits
        else:
            ys, xs, sp = fn(x), x, None
        verdict = None
        if ys is not None:
            verdict = epmoe.compare_to_reference(ys, xs, **weights, config=cfg, splits=sp)
        both = [None] * state.world_size
        dist.all_gather_object(both, None if verdict is None else (verdict.ok, str(verdict)))
        seen = [v for v in both if v is not None]
        ok[name] = all(v[0] for v in seen)
        checks[name] = "; ".join(v[1] for v in seen)
    alltoall = contenders["epmoe alltoall"][0]
    alltoall.collect_stats = True
    alltoall(x)
    counts = alltoall.last_stats.recv_per_local_expert
    alltoall.collect_stats = False
    xm = torch.randn(sum(counts), 1024, generator=gen).to(torch.bfloat16)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    runs = {n: c for n, c in contenders.items() if ok[n]}
    extra = {"floor (loop)": lambda: _floor(xm, counts, alltoall),
             "floor (grouped_mm)": lambda: _floor_grouped(xm, offs, alltoall),
             "empty all-to-all": lambda: _empty_a2a(state)}
    times: dict[str, list[float]] = {n: [] for n in [*runs, *extra]}
    for i in range(reps + 2):
        for name, (fn, rank0_only) in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            if rank0_only:
                if fn is not None:
                    torch.set_num_threads(2)
                    fn(x_all)
                    torch.set_num_threads(1)
            else:
                fn(x)
            dt = time.perf_counter() - t0
            if rank0_only:  # rank 0's time is the peer's
                both = [None] * state.world_size
                dist.all_gather_object(both, dt)
                dt = both[0]
            if i >= 2:
                times[name].append(1e3 * dt)
        for name, fn in extra.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                times[name].append(1e3 * (time.perf_counter() - t0))
    group, everyone = slowest_rank(times)
    return dict(tokens_per_rank=tokens, ms=group, per_rank_ms=everyone, checks=checks,
                passed=ok, notes=notes,
                floor_ms=min(group["floor (loop)"], group["floor (grouped_mm)"]))


def main(reps: int = 15, out: str | None = None, tokens: list[int] | None = None) -> list[dict]:
    state = epmoe.init_distributed(force_cpu=True)
    torch.set_num_threads(1)
    results = [measure(t, reps, state) for t in tokens or [2048, 8]]
    if state.rank == 0:
        for r in results:
            print(table(r))
        if out:
            Path(out).write_text(json.dumps(results, indent=1) + "\n")
    epmoe.destroy_distributed()
    return results


def table(r: dict) -> str:
    ms, best = r["ms"], min(v for n, v in r["ms"].items() if n.startswith("epmoe"))
    lines = [f"\n{r['tokens_per_rank']} tokens per rank, bf16, Mixtral-like; median ms "
             "(slowest rank)", "| contender | ms | vs fastest epmoe |", "| --- | --- | --- |"]
    for name, v in sorted(ms.items(), key=lambda kv: kv[1]):
        lines.append(f"| {name} | {v:.2f} | {v / best:.2f}x |")
    for name, ok in r["passed"].items():
        if not ok:
            lines.append(f"| {name} | failed its check, not timed: {r['checks'][name]} | |")
    for name, why in r["notes"].items():
        lines.append(f"| {name} | not run: {why} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", dest="out", default=None)
    p.add_argument("--tokens", type=int, action="append")
    main(**vars(p.parse_args()))
