"""Benchmark the expert-parallel MoE layer: every preset, mode, dtype and backend asked for.

    torchrun --nproc_per_node=2 -m epmoe bench                       # the default sweep
    torchrun --nproc_per_node=2 -m epmoe bench --preset mixtral --mode prefill \\
        --tokens 2048 --dtype bfloat16 --backend alltoall --json out.json --plot out.png

Presets: ``mixtral`` (H=1024, F=2048, E=8, top-2) and ``deepseek`` (H=1024,
F=256, E=64, top-6, one shared expert). Modes: ``prefill`` (512, 2048, 8192
tokens per rank) and ``decode`` (1, 8, 64). For each case rank 0 prints the
group's tokens/s, layer time, the floor (expert matrix products alone, same
rows, same run) and efficiency = floor / layer time, the phases, the bytes sent
against the exact minimum, and the load imbalance. Times are medians of
interleaved runs; see ``epmoe.benchmark``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

from ..benchmark import MODES, PRESETS, measure_case, preset_config, summarize
from ..collectives import gather_objects
from ..config import BACKENDS
from ..parallel_state import destroy_distributed, init_distributed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="repeatable; default: both")
    p.add_argument("--mode", action="append", choices=sorted(MODES),
                   help="repeatable; default: both")
    p.add_argument("--tokens", type=int, action="append",
                   help="tokens per rank (repeatable); default: the mode's sizes")
    p.add_argument("--dtype", action="append", choices=["bfloat16", "float32"],
                   help="repeatable; default: both")
    p.add_argument("--backend", action="append", choices=list(BACKENDS),
                   help="repeatable; default: all three")
    p.add_argument("--dispatch-dtype", default=None, choices=["bfloat16", "float8_e4m3"])
    p.add_argument("--microbatches", action="store_true", help="overlap two micro-batches")
    p.add_argument("--overlap-shared", action="store_true",
                   help="run the shared expert during dispatch")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--plot", default=None, help="write a PNG of tokens/s and efficiency")
    p.add_argument("--force-cpu", action="store_true")


def cases(preset, mode, tokens, dtype, backend):
    for pr in preset or sorted(PRESETS):
        for md in mode or ["prefill", "decode"]:
            for n in tokens or MODES[md]:
                for dt in dtype or ["bfloat16", "float32"]:
                    for be in backend or list(BACKENDS):
                        yield pr, md, n, dt, be


def main(preset, mode, tokens, dtype, backend, dispatch_dtype, microbatches, overlap_shared,
         reps, json: str | None, plot: str | None, force_cpu: bool) -> int:
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    if tokens and any(n < 1 for n in tokens):
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    state = init_distributed(force_cpu=force_cpu)
    rows = []
    try:
        for pr, md, n, dt, be in cases(preset, mode, tokens, dtype, backend):
            cfg = preset_config(pr, dt, be, n, dispatch_dtype=dispatch_dtype,
                                overlap_microbatches=microbatches,
                                overlap_shared=overlap_shared)
            mine = measure_case(cfg, state, n, reps=reps)
            everyone = gather_objects(mine, state.ep_group)
            row = dict(preset=pr, mode=md, tokens_per_rank=n, dtype=dt, backend=be,
                       dispatch_dtype=dispatch_dtype, microbatches=microbatches,
                       **summarize(everyone))
            rows.append(row)
            if state.rank == 0:
                print(format_row(row), flush=True)
        if state.rank == 0:
            out = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                       machine=machine(state), results=rows)
            if json:
                Path(json).write_text(__import__("json").dumps(out, indent=1) + "\n")
                print(f"wrote {json}")
            if plot:
                write_plot(rows, plot)
                print(f"wrote {plot}")
    finally:
        destroy_distributed()
    return 0


def machine(state) -> dict:
    return dict(ranks=state.ep_size, threads_per_rank=torch.get_num_threads(),
                device=state.device.type, backend=state.backend, torch=torch.__version__,
                processor=platform.processor() or platform.machine(),
                cpus=__import__("os").cpu_count())


HEADER = ("preset   mode     T/rank dtype     backend                  tokens/s  layer ms  "
          "floor ms  eff.  router/dispatch/experts/combine ms (rank 0)  token bytes/min  imb.")


def format_row(r: dict) -> str:
    p = r["per_rank"][0]["phases_ms"]
    phases = "/".join(f"{p.get(k, 0):.2f}" for k in ("router", "dispatch", "experts", "combine"))
    ratio = r["remote_token_bytes"] / r["min_token_bytes"] if r["min_token_bytes"] else 1.0
    return (f"{r['preset']:8s} {r['mode']:8s} {r['tokens_per_rank']:6d} {r['dtype']:9s} "
            f"{r['backend']:23s} {r['tokens_per_s']:9.0f} {r['layer_ms']:9.2f} "
            f"{r['floor_ms']:9.2f} {r['efficiency']:5.2f}  {phases:43s}  {ratio:15.2f}  "
            f"{r['imbalance']:.2f}")


def write_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["preset"], r["mode"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3 * len(groups)), squeeze=False)
    for ax, g in zip(axes, groups, strict=True):
        for be in sorted({r["backend"] for r in rows}):
            rs = sorted((r for r in rows if (r["preset"], r["mode"], r["dtype"]) == g
                         and r["backend"] == be), key=lambda r: r["tokens_per_rank"])
            t = [r["tokens_per_rank"] for r in rs]
            ax[0].plot(t, [r["tokens_per_s"] for r in rs], "o-", label=be)
            ax[1].plot(t, [r["efficiency"] for r in rs], "o-", label=be)
        for a, label in zip(ax, ("tokens/s (group)", "efficiency (floor / layer)"),
                            strict=True):
            a.set_xscale("log", base=2)
            a.set_xlabel("tokens per rank")
            a.set_ylabel(label)
            a.set_title(" ".join(g))
            a.grid(True, alpha=0.3)
        ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
