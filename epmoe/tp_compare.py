"""Expert parallelism beside tensor parallelism on the same tokens: the seed's table, measured.

    torchrun --nproc_per_node=2 demo.py --compare
    torchrun --nproc_per_node=2 benchmarks/ep_vs_tp.py

The same layer (``MoEConfig``, weights from the same seed) runs three ways over one
group of ranks, on the same global batch:

- ``EP``: each rank holds whole experts; its own tokens travel to them (alltoall);
- ``TP, own tokens``: each rank holds a slice of every expert's F; the group's
  tokens are gathered, every rank computes every expert on its slice, the partial
  outputs are reduce-scattered back (``tp_tokens="own"``);
- ``TP, replicated``: every rank passes the whole batch; the partial outputs are
  summed by one all-reduce (``tp_tokens="replicated"``, Megatron's and vLLM's MoE
  without EP).

Measured per mode: expert-weight bytes per rank, the collectives one forward calls
(counted by wrapping ``torch.distributed``), the bytes a rank sends (tokens, routing
and results; the few bytes of headers aside), the time per forward (median of
interleaved forwards after a barrier, the slower rank's), and the max error against
``reference_moe`` in the layer's dtype on the whole batch, with the verdict of
``compare_to_reference`` (the tolerance the tests use).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .collectives import all_gather_v, gather_objects
from .config import MoEConfig
from .moe import ExpertParallelMoE
from .parallel_state import ParallelState
from .reference import compare_to_reference, full_optional_weights, full_weights, reference_moe

__all__ = ["MODES", "compare", "markdown_table", "text_table"]

MODES = {
    "EP": dict(parallelism="expert"),
    "TP, own tokens": dict(parallelism="tensor", tp_tokens="own"),
    "TP, replicated": dict(parallelism="tensor", tp_tokens="replicated"),
}
COLLECTIVES = ("all_to_all_single", "all_gather", "all_gather_object", "all_reduce",
               "reduce_scatter_tensor", "broadcast")
NAMES = {"all_to_all_single": "all-to-all", "all_gather": "all-gather",
         "all_gather_object": "all-gather", "all_reduce": "all-reduce",
         "reduce_scatter_tensor": "reduce-scatter", "broadcast": "broadcast"}


@contextmanager
def counting_collectives() -> Iterator[Counter]:
    """Count the ``torch.distributed`` collectives called inside, by name."""
    seen: Counter = Counter()
    saved = {n: getattr(dist, n) for n in COLLECTIVES}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)
        return counted

    for n, fn in saved.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield seen
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


def _describe(seen: Counter) -> tuple[str, int]:
    total = sum(seen.values())
    by_kind: Counter = Counter()
    for n, c in seen.items():
        by_kind[NAMES[n]] += c
    return ", ".join(f"{c} {k}" for k, c in sorted(by_kind.items())) or "none", total


def _timed(layer: ExpertParallelMoE, x: torch.Tensor, state: ParallelState) -> float:
    if state.ep_group is not None:
        dist.barrier(group=state.ep_group)
    t0 = time.perf_counter()
    with torch.no_grad():
        layer(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0)
    return max(gather_objects(ms, state.ep_group))


def _tokens_for(layer: ExpertParallelMoE, x_own: torch.Tensor,
                x_all: torch.Tensor) -> torch.Tensor:
    """The group's whole batch for a replicated-tokens layer, else this rank's tokens."""
    replicated = layer.tensor_parallel and layer.config.tp_tokens == "replicated"
    return x_all if replicated else x_own


def compare(state: ParallelState, config: MoEConfig, sizes: dict[str, int], reps: int = 9,
            seed: int = 0) -> list[dict]:
    """Every mode of :data:`MODES` for each ``{size name: tokens per rank}``; the same
    list on every rank. Every rank of the group calls it together."""
    base = config.replace(parallelism="expert", tp_tokens="own")
    layers = {name: ExpertParallelMoE(base.replace(**m), state, seed=seed, collect_stats=True)
              for name, m in MODES.items()}
    weights = full_weights(base, seed)
    optional = full_optional_weights(base, seed)
    out = {name: {"mode": name, "ms": {}, "bytes_sent": {}, "error": {}} for name in MODES}
    for size, tokens in sizes.items():
        gen = torch.Generator().manual_seed(seed * 1000 + 17 * tokens + state.rank)
        x_own = torch.randn(tokens, base.hidden_size, generator=gen).to(base.dtype)
        x_own = x_own.to(state.device)
        with torch.no_grad():
            x_all, splits = all_gather_v(x_own, state.ep_group)
        for name, layer in layers.items():
            x = _tokens_for(layer, x_own, x_all)
            with torch.no_grad(), counting_collectives() as seen:
                y = layer(x)
            s = layer.last_stats
            me = state.ep_rank
            sent = sum(b for j, b in enumerate(s.dispatch_bytes) if j != me) + \
                sum(b for j, b in enumerate(s.combine_bytes) if j != me)
            with torch.no_grad():
                y_all = y if x is x_all else all_gather_v(y, state.ep_group)[0]
            err = None
            if state.ep_rank == 0:  # the reference in the layer's dtype, and the tolerance
                xa, ya = x_all.cpu(), y_all.cpu()  # check of the tests (compare_to_reference)
                ref = reference_moe(xa, *weights, config=base, **optional)
                check = compare_to_reference(ya, xa, *weights, config=base, **optional,
                                             splits=None if x is x_all else splits)
                err = (float((ya.float() - ref.float()).abs().max()), check.ok)
            o = out[name]
            o["collectives"], o["count"] = _describe(seen)
            o["bytes_sent"][size] = max(gather_objects(sent, state.ep_group))
            o["error"][size] = gather_objects(err, state.ep_group)[0]
            o["expert_bytes"] = max(gather_objects(layer.expert_weight_bytes(), state.ep_group))
            o["tokens_per_rank"] = x.shape[0]
            a, b = layer.f_slice
            o["holds"] = (f"F {a}-{b - 1} of all {base.num_experts} experts"
                          if layer.tensor_parallel else
                          f"{len(layer.local_experts)} of {base.num_experts} experts, whole")
        times: dict[str, list[float]] = {name: [] for name in layers}
        for layer in layers.values():
            layer.collect_stats = False
        for i in range(reps + 1):  # (one warm-up round)
            for name, layer in layers.items():
                x = _tokens_for(layer, x_own, x_all)
                t = _timed(layer, x, state)
                if i:
                    times[name].append(t)
        for name in layers:
            out[name]["ms"][size] = statistics.median(times[name])
            layers[name].collect_stats = True
    return list(out.values())


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def rows(results: list[dict], sizes: dict[str, int]) -> tuple[list[str], list[list[str]]]:
    names = list(sizes)
    head = ["mode", "a rank holds (rank 0)", "expert weights per rank",
            "collectives per layer"] + \
        [f"bytes sent per rank, {n}" for n in names] + [f"ms per layer, {n}" for n in names] + \
        ["max error vs reference (check)"]
    body = []
    for r in results:
        body.append([r["mode"], r["holds"], _mib(r["expert_bytes"]),
                     f"{r['count']}: {r['collectives']}"]
                    + [_mib(r["bytes_sent"][n]) for n in names]
                    + [f"{r['ms'][n]:.2f}" for n in names]
                    + [f"{max(r['error'][n][0] for n in names):.2g} ("
                       f"{'ok' if all(r['error'][n][1] for n in names) else 'FAILED'})"])
    return head, body


def markdown_table(results: list[dict], sizes: dict[str, int]) -> str:
    head, body = rows(results, sizes)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(results: list[dict], sizes: dict[str, int]) -> str:
    head, body = rows(results, sizes)
    cells = [head] + body
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
