"""Shared expert overlapped with the dispatch all-to-all, or run after it: layer time.

    torchrun --nproc_per_node=2 benchmarks/shared_overlap.py [--tokens 2048] [--reps 21]

A DeepSeek-like layer (H=1024, 64 experts of F=256, top-6, a shared expert of
F=2048), bf16, the same tokens; the two settings interleaved, medians on rank 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import epmoe


def main(tokens: int = 2048, reps: int = 21, dtype: str = "bfloat16") -> None:
    state = epmoe.init_distributed(force_cpu=True)
    base = epmoe.MoEConfig(hidden_size=1024, intermediate_size=256, num_experts=64, top_k=6,
                           shared_intermediate_size=2048, dtype=dtype)
    layers = {flag: epmoe.ExpertParallelMoE(base.replace(overlap_shared=flag), state, seed=1)
              for flag in (True, False)}
    x = torch.randn(tokens, 1024, generator=torch.Generator().manual_seed(state.rank)).to(
        base.dtype)
    times = {True: [], False: []}
    with torch.no_grad():
        for i in range(reps + 2):
            for flag, layer in layers.items():
                dist.barrier()
                t0 = time.perf_counter()
                layer(x)
                if i >= 2:  # two warm-up rounds
                    times[flag].append(time.perf_counter() - t0)
    if state.rank == 0:
        on, off = (statistics.median(times[f]) for f in (True, False))
        print(f"{state.world_size} ranks, {tokens} tokens per rank, {dtype}, "
              f"{torch.get_num_threads()} thread(s) per rank, median of {reps}:")
        print(f"  shared expert overlapped with dispatch: {1e3 * on:.1f} ms")
        print(f"  shared expert after combine:            {1e3 * off:.1f} ms  "
              f"(overlap saves {100 * (1 - on / off):.1f}%)")
    epmoe.destroy_distributed()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--dtype", default="bfloat16")
    main(**vars(p.parse_args()))
