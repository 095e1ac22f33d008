"""Measure an expert-parallel MoE layer the way ``python -m epmoe bench`` reports it.

One case is one layer configuration and token count per rank, run on every rank
of the EP group together. Per rank it measures, as medians of interleaved runs
(each run after a barrier, so that the ranks start together):

* the layer's forward time, and the time of each phase (router, dispatch,
  experts, combine) from the layer's own statistics;
* the floor: the expert matrix products alone (gate/up and down, no
  activation, no routing, no communication) on the same rows per local
  expert as the layer computed, and the shared expert's on the rank's own
  tokens, in the same run;
* two empty all-to-alls (the latency any dispatch and combine must pay);
* bytes sent: token bytes to remote ranks against the exact minimum (each
  token once per remote rank that holds one of its experts), and the whole
  dispatch and combine traffic; load imbalance (max over mean of the (token,
  expert) pairs computed per rank).

Efficiency = floor / layer time. Shape legend: T tokens per rank, H hidden.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from .config import MoEConfig
from .moe import ExpertParallelMoE
from .parallel_state import ParallelState

__all__ = ["PRESETS", "CaseResult", "measure_case", "preset_config", "slowest_rank"]

PRESETS = {
    # Mixtral-like: 8 experts of F=2048, top-2
    "mixtral": dict(hidden_size=1024, intermediate_size=2048, num_experts=8, top_k=2),
    # DeepSeek-like fine-grained: 64 experts of F=256, top-6, one shared expert
    "deepseek": dict(hidden_size=1024, intermediate_size=256, num_experts=64, top_k=6,
                     shared_intermediate_size=256),
}
MODES = {"prefill": [512, 2048, 8192], "decode": [1, 8, 64]}


def preset_config(preset: str, dtype: str, backend: str, tokens: int, **changes) -> MoEConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cap = {"max_tokens_per_rank": tokens} if backend == "low_latency" else {}
    return MoEConfig(**PRESETS[preset], dtype=dtype, all2all_backend=backend, **cap, **changes)


@dataclass
class CaseResult:
    """One rank's figures for one case (times in ms, medians)."""

    rank: int
    tokens: int
    layer_ms: float
    floor_ms: float
    empty_a2a_ms: float  # one empty all-to-all
    phases_ms: dict[str, float]
    pairs: int  # (token, expert) pairs this rank's experts computed
    remote_token_bytes: int  # token bytes sent to other ranks in dispatch
    min_token_bytes: int  # the least: one row per (token, remote rank with its experts)
    dispatch_bytes: int  # all bytes sent to other ranks in dispatch (with routing metadata)
    combine_bytes: int  # bytes sent to other ranks in combine
    max_abs_out: float  # of this rank's output: a sanity figure
    dispatch_error: float | None = None  # low-precision dispatch: max |y - y_exact| / max |y|


def _barrier(state: ParallelState) -> None:
    if state.ep_size > 1:
        dist.barrier(group=state.ep_group)


def _shared_products(x_TH, layer: ExpertParallelMoE) -> None:
    if layer.config.shared_intermediate_size:  # the shared expert is an expert too
        g = x_TH @ layer.shared_gate.T
        x_TH @ layer.shared_up.T
        g @ layer.shared_down.T


def _floor(x_MH, counts: list[int], layer: ExpertParallelMoE, x_TH=None) -> None:
    """The expert products alone (routed, and shared on this rank's tokens ``x_TH``), as
    a loop or as one grouped product: whichever is faster is the floor (see
    ``benchmarks/expert_impl.py``)."""
    w_gu, w_d, Fi = layer.w_gate_up, layer.w_down, layer.config.intermediate_size
    start = 0
    for i, n in enumerate(counts):
        gu = x_MH[start : start + n] @ w_gu[i].T
        gu[:, :Fi] @ w_d[i].T
        start += n
    if x_TH is not None:
        _shared_products(x_TH, layer)


def _floor_grouped(x_MH, offs, layer: ExpertParallelMoE, x_TH=None) -> None:
    Fi = layer.config.intermediate_size
    gu = torch.nn.functional.grouped_mm(x_MH, layer.w_gate_up.transpose(1, 2), offs=offs)
    torch.nn.functional.grouped_mm(gu[:, :Fi], layer.w_down.transpose(1, 2), offs=offs)
    if x_TH is not None:
        _shared_products(x_TH, layer)


def _empty_a2a(state: ParallelState) -> None:
    if state.ep_size > 1:
        t = torch.empty(0, device=state.device)
        dist.all_to_all_single(t, t, [0] * state.ep_size, [0] * state.ep_size,
                               group=state.ep_group)


@torch.no_grad()
def measure_case(config: MoEConfig, state: ParallelState, tokens: int, reps: int = 9,
                 warmup: int = 2, seed: int = 0) -> CaseResult:
    """Run one case on every rank of ``state``'s EP group (all must call it together)."""
    layer = ExpertParallelMoE(config, state, seed=seed)
    gen = torch.Generator().manual_seed(seed * 7919 + state.rank)
    x = torch.randn(tokens, config.hidden_size, generator=gen).to(config.dtype).to(state.device)
    # A statistics pass: rows per local expert and bytes (the timed forwards below
    # run without statistics; on CUDA their timers would synchronise the device).
    layer.collect_stats = True
    y = layer(x)
    s = layer.last_stats
    layer.collect_stats = False
    counts = s.recv_per_local_expert
    phases: dict[str, list[float]] = {}

    def layer_with_phases():
        # On the CPU the phase timers cost a clock read each: the timed forward
        # itself reports its phases. (On CUDA they would synchronise: left off.)
        layer.collect_stats = state.device.type == "cpu" and not config.overlap_microbatches
        layer(x)
        if layer.collect_stats:
            for k, v in layer.last_stats.seconds.items():
                phases.setdefault(k, []).append(1e3 * v)
        layer.collect_stats = False
    xm = torch.randn(sum(counts), config.hidden_size, generator=gen).to(config.dtype)
    xm = xm.to(state.device)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(state.device)
    runs = {"layer": layer_with_phases, "loop": lambda: _floor(xm, counts, layer, x),
            "grouped": lambda: _floor_grouped(xm, offs, layer, x),
            "a2a": lambda: _empty_a2a(state)}
    if not hasattr(torch.nn.functional, "grouped_mm"):
        runs.pop("grouped")
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + reps):  # interleaved: each kind of run sees the same noise
        for k, fn in runs.items():
            _barrier(state)
            t0 = time.perf_counter()
            fn()
            if state.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(1e3 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    phases = {k: v[warmup:] for k, v in phases.items()}
    floor = min(med["loop"], med.get("grouped", float("inf")))
    error = None
    if config.dispatch_dtype is not None:  # what the rounding on the wire costs
        exact = ExpertParallelMoE(config.replace(dispatch_dtype=None), state, seed=seed)(x)
        error = float((y.float() - exact.float()).abs().max() / exact.float().abs().max()) \
            if y.numel() else 0.0
    G, me, H = state.ep_size, state.ep_rank, config.hidden_size
    item = torch.empty((), dtype=config.dtype).element_size()
    row = layer.dispatcher.token_bytes(H)
    remote = [j for j in range(G) if j != me]
    return CaseResult(
        rank=state.rank, tokens=tokens, layer_ms=med["layer"], floor_ms=floor,
        empty_a2a_ms=med["a2a"],
        phases_ms={k: statistics.median(v) for k, v in phases.items() if v},
        pairs=sum(counts),
        remote_token_bytes=sum(s.send_rows[j] for j in remote) * row,
        min_token_bytes=sum(s.needed_rows[j] for j in remote) * H * item,
        dispatch_bytes=sum(s.dispatch_bytes[j] for j in remote),
        combine_bytes=sum(s.combine_bytes[j] for j in remote),
        max_abs_out=float(y.float().abs().max()) if y.numel() else 0.0, dispatch_error=error,
    )


def slowest_rank(times_ms: dict[str, list[float]]) -> tuple[dict[str, float], list[dict]]:
    """Each name's median on this rank, gathered over the world: ``(group, every)``, the
    group's figure per name (its slowest rank's median: the group moves at its pace) and
    every rank's medians. A collective."""
    med = {n: statistics.median(v) for n, v in times_ms.items()}
    every = [med]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, med)
    return {n: max(m[n] for m in every) for n in med}, every


def summarize(per_rank: list[CaseResult]) -> dict:
    """The group's figures from every rank's: the slowest rank sets the pace."""
    layer = max(r.layer_ms for r in per_rank)
    pairs = [r.pairs for r in per_rank]
    mean_pairs = sum(pairs) / len(pairs)
    return dict(
        tokens_per_s=1e3 * sum(r.tokens for r in per_rank) / layer,
        layer_ms=layer,
        floor_ms=max(r.floor_ms for r in per_rank),
        efficiency=max(r.floor_ms for r in per_rank) / layer,
        empty_a2a_ms=max(r.empty_a2a_ms for r in per_rank),
        imbalance=max(pairs) / mean_pairs if mean_pairs else 1.0,
        remote_token_bytes=sum(r.remote_token_bytes for r in per_rank),
        min_token_bytes=sum(r.min_token_bytes for r in per_rank),
        dispatch_bytes=sum(r.dispatch_bytes for r in per_rank),
        combine_bytes=sum(r.combine_bytes for r in per_rank),
        dispatch_error=max((r.dispatch_error for r in per_rank if r.dispatch_error is not None),
                           default=None),
        per_rank=[{**asdict(r), "tokens_per_s": 1e3 * r.tokens / r.layer_ms} for r in per_rank],
    )
