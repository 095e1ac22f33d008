"""What ``MoEConfig.batch_invariant`` costs: the layer with and without it, one process.

    python benchmarks/batch_invariant.py [--reps 15] [--json out.json]

The Mixtral-like and DeepSeek-like presets of ``epmoe bench``, fp32 and bf16, 8
and 2048 tokens, one thread; the two layers hold the same weights and their
forwards are interleaved (median of ``--reps``). Also checks the point of the
mode: the first token's output alone and inside the batch, bitwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import epmoe
from epmoe.benchmark import preset_config


def measure(preset: str, dtype: str, tokens: int, reps: int) -> dict:
    state = epmoe.single_process_state("cpu")
    layers = {}
    for invariant in (False, True):
        cfg = preset_config(preset, dtype, "alltoall", tokens).replace(batch_invariant=invariant)
        layers[invariant] = epmoe.ExpertParallelMoE(cfg, state, seed=0)
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x.to(cfg.dtype)
    ms = {False: [], True: []}
    with torch.no_grad():
        for i in range(reps + 2):
            for invariant, layer in layers.items():
                t0 = time.perf_counter()
                layer(x)
                if i >= 2:  # (two warm-up rounds)
                    ms[invariant].append(1e3 * (time.perf_counter() - t0))
        same = {inv: torch.equal(layer(x[:1])[0], layer(x)[0]) for inv, layer in layers.items()}
    plain, inv = statistics.median(ms[False]), statistics.median(ms[True])
    return dict(preset=preset, dtype=dtype, tokens=tokens, plain_ms=plain, invariant_ms=inv,
                ratio=inv / plain, alone_equals_in_batch=same)


def main(reps: int, json_out: str | None) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for preset in ("mixtral", "deepseek"):
        for dtype in ("float32", "bfloat16"):
            for tokens in (8, 2048):
                r = measure(preset, dtype, tokens, reps)
                rows.append(r)
                print(f"{preset} {dtype} {tokens} tokens: {r['plain_ms']:.1f} ms, "
                      f"batch_invariant {r['invariant_ms']:.1f} ms ({r['ratio']:.2f}x); token 0 "
                      f"alone = in the batch: {r['alone_equals_in_batch'][False]} plain, "
                      f"{r['alone_equals_in_batch'][True]} batch_invariant", flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json")
    a = p.parse_args()
    main(a.reps, a.json)
