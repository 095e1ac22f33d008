"""Check the expert-parallel layer against the reference on this world of ranks.

    torchrun --nproc_per_node=2 -m epmoe check                 # every backend, once
    torchrun --nnodes=2 --node-rank=0 ... -m epmoe check        # across hosts, the same
    torchrun --nproc_per_node=2 -m epmoe check --forwards 500 --skew 1.2   # a soak

Every rank builds the same seeded layer, passes its own tokens (a count of its
own, varying per forward; with ``--skew`` each forward's tokens lean towards one
random expert, so that it takes most of them), and compares its output with ``epmoe.reference_moe``
on the same tokens, computed locally with every expert. Rank 0 prints one line
per backend (or progress lines with ``--forwards``), the resident memory of
every rank at the start and the end (a fresh process grows by about 13 MiB over
its first thousand forwards, in gloo as much as in epmoe, then stays flat;
``tests/test_soak.py`` measures after that), and PASS or FAIL. A rank that dies,
stalls or becomes unreachable makes the others end with the error that names
it (exit code 3); a FAIL exits 1.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import torch.distributed as dist

from ..collectives import gather_objects
from ..config import BACKENDS, MoEConfig
from ..errors import RankFailure
from ..moe import ExpertParallelMoE
from ..parallel_state import ParallelState, destroy_distributed, init_distributed
from ..reference import compare_to_reference, full_optional_weights, full_weights


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", action="append", choices=list(BACKENDS),
                   help="repeatable; default: every backend")
    p.add_argument("--forwards", type=int, default=1, help="forwards per backend (default 1)")
    p.add_argument("--tokens", type=int, default=48, help="most tokens per rank and forward")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--skew", type=float, default=0.0,
                   help="push each forward's tokens towards one random expert (0: none; "
                        "1: most tokens to it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--timeout", type=float, default=30.0, help="collective timeout, seconds")
    p.add_argument("--force-cpu", action="store_true")
    p.add_argument("--progress", type=int, default=0,
                   help="print a line every N forwards (0: only the summary)")


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _check_backend(state: ParallelState, backend: str, a: argparse.Namespace) -> dict:
    E = max(a.experts, state.ep_size)
    cfg = MoEConfig(hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_experts=E,
                    top_k=2, dtype=a.dtype, all2all_backend=backend,
                    max_tokens_per_rank=a.tokens if backend == "low_latency" else 0)
    layer = ExpertParallelMoE(cfg, state, seed=0, name=f"the {backend} check layer")
    router, w_gate, w_up, w_down = full_weights(cfg, seed=0)
    optional = full_optional_weights(cfg, seed=0)
    gen = torch.Generator().manual_seed(1000 + state.rank)
    unit = router.float() / router.float().norm(dim=1, keepdim=True)  # [E, H]
    worst, rss = 0.0, [rss_mib()]
    for i in range(a.forwards):
        T = int(torch.randint(0, a.tokens + 1, (1,), generator=gen))
        x = torch.randn(T, a.hidden, generator=gen)
        if a.skew:  # most tokens to a hot expert, a new one each forward (per rank)
            hot = int(torch.randint(0, E, (1,), generator=gen))
            x = x + a.skew * 4 * unit[hot]
        x = x.to(cfg.dtype)
        with torch.no_grad():
            y = layer(x.to(state.device)).cpu()
        cmp = compare_to_reference(y, x, router, w_gate, w_up, w_down, cfg, **optional)
        worst = max(worst, cmp.worst_ratio)
        if not cmp.ok:
            return {"backend": backend, "ok": False, "forwards": i + 1, "worst": worst,
                    "detail": str(cmp), "rss": rss + [rss_mib()]}
        if a.progress and (i + 1) % a.progress == 0:
            rss.append(rss_mib())
            if state.rank == 0:
                print(f"  {backend}: forward {i + 1}/{a.forwards} ok, rss {rss[-1]:.1f} MiB",
                      flush=True)
    return {"backend": backend, "ok": True, "forwards": a.forwards, "worst": worst,
            "rss": rss + [rss_mib()]}


def main(**kwargs) -> int:
    a = argparse.Namespace(**kwargs)
    if a.forwards < 1 or a.tokens < 0:
        raise ValueError(f"--forwards must be >= 1 and --tokens >= 0, got {a.forwards}, "
                         f"{a.tokens}")
    state = init_distributed(force_cpu=a.force_cpu, timeout_s=a.timeout)
    try:
        results = []
        for backend in a.backend or BACKENDS:
            t0 = time.perf_counter()
            r = _check_backend(state, backend, a)
            r["seconds"] = time.perf_counter() - t0
            everyone = gather_objects(r, dist.group.WORLD)
            results.append(everyone)
            if state.rank == 0:
                ok = all(e["ok"] for e in everyone)
                rss = "; ".join(f"rank {j}: {e['rss'][0]:.0f} -> {e['rss'][-1]:.0f} MiB"
                                for j, e in enumerate(everyone))
                print(f"{backend}: {a.forwards} forward(s) on {state.world_size} rank(s), worst "
                      f"token at {max(e['worst'] for e in everyone):.2f} of its allowance, "
                      f"resident memory {rss} -> {'PASS' if ok else 'FAIL'}", flush=True)
                for j, e in enumerate(everyone):
                    if not e["ok"]:
                        print(f"  rank {j}: forward {e['forwards']}: {e['detail']}", flush=True)
        ok = all(e["ok"] for everyone in results for e in everyone)
    except RankFailure as e:
        print(f"epmoe check: rank {state.rank}: {e}", file=sys.stderr, flush=True)
        return 3
    destroy_distributed(state)
    return 0 if ok else 1
