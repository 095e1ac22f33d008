"""Which way to run the local experts: a loop of products per expert, or one grouped product.

    python benchmarks/expert_impl.py [--reps 15] [--threads 1]

For the benchmark presets' local experts on one of 2 EP ranks (Mixtral-like:
4 experts of H=1024, F=2048; DeepSeek-like: 32 experts of F=256), at prefill
and decode row counts, in bf16 and fp32, times (medians of interleaved runs)
the whole expert computation (gate/up product, activation, down product) with
``run_experts``'s two implementations, and the two matrix products alone (the
floor). ``epmoe.experts.choose_expert_impl`` encodes the choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from epmoe import MoEConfig
from epmoe.experts import ExpertWeights, gated_activation, run_experts

SHAPES = {  # name: (H, F, local experts, rows per expert)
    "mixtral prefill": (1024, 2048, 4, 1024),
    "mixtral decode": (1024, 2048, 4, 4),
    "deepseek prefill": (1024, 256, 32, 384),
    "deepseek decode": (1024, 256, 32, 2),
}


def gemms_only(x, counts, w):
    """The two products of every expert on its rows, nothing else: the floor."""
    Fi, out, start = w.w_down.shape[2], [], 0
    for i, n in enumerate(counts):
        gu = x[start : start + n] @ w.w_gate_up[i].T
        out.append(gu[:, :Fi] @ w.w_down[i].T)
        start += n
    return out


def main(reps: int = 15, threads: int = 1, json_out: str | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, (H, Fi, e, n) in SHAPES.items():
            glu = gated_activation(MoEConfig(hidden_size=H, intermediate_size=Fi, num_experts=e))
            w = ExpertWeights(0.02 * torch.randn(e, 2 * Fi, H).to(dtype),
                              0.02 * torch.randn(e, H, Fi).to(dtype))
            counts = [n] * e
            x = torch.randn(n * e, H).to(dtype)
            args = (x, counts, w)
            fns = {"loop": lambda a=args, g=glu: run_experts(*a, g, "loop"),
                   "grouped_mm": lambda a=args, g=glu: run_experts(*a, g, "grouped_mm"),
                   "floor": lambda a=args: gemms_only(*a)}
            times = {k: [] for k in fns}
            with torch.no_grad():
                for i in range(reps + 3):
                    for k, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        if i >= 3:  # warm-up rounds dropped
                            times[k].append(time.perf_counter() - t0)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            best = min(("loop", "grouped_mm"), key=med.get)
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), shape=name, **med,
                             best=best))
            print(f"{rows[-1]['dtype']:9s} {name:17s} loop {med['loop']:8.2f} ms  grouped_mm "
                  f"{med['grouped_mm']:8.2f} ms  products alone {med['floor']:8.2f} ms  -> {best}",
                  flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", dest="json_out", default=None)
    main(**vars(p.parse_args()))
