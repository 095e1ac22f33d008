"""Keeping the ranks in step while serving: one small agreement per step, then one step.

Every MoE layer is a collective of its EP group, so every rank must run the
same number of model forwards. Each step begins with one all-gather (:func:`gather_small`)
over the world (SGLang gathers its batch sizes every step the same way) in
which

* rank 0, the only rank that hears HTTP, gives its orders: the new requests,
  each assigned to the rank with the least outstanding tokens (prompt plus
  ``max_tokens`` not yet produced: vLLM's least-load routing, weighted by
  tokens), the aborts, and whether to stop;
* every rank reports the tokens it produced in the previous step (rank 0
  hands them to the HTTP streams), its queue lengths, and whether it has work.

From the gathered list, identical on every rank, each computes whether the
group steps: it does if any rank has work or got a request. Then each rank
runs its own tokens, or a zero step. When no rank has work, no rank steps:
rank 0 waits for a request (up to ``idle_wait_s``, then a heartbeat round so
no collective times out) and the others wait inside the next agreement.
Idle costs one small collective a second and no spinning.

A rank that dies or stalls makes the agreement (or an MoE collective) fail on
the others with :class:`~epmoe.errors.RankFailure` naming it: rank 0 then
fails every request in flight (the front answers 503) and stops.
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ..health import guarded
from ..parallel_state import ParallelState
from .client import EngineClient, EngineStats
from .engine import Engine, RankReport
from .types import Request, StepOutput

__all__ = ["Orders", "serve_loop"]


@dataclass
class Orders:
    """Rank 0's part of a step's agreement."""

    assign: list[tuple[int, Request]] = field(default_factory=list)  # (rank, request)
    aborts: list[str] = field(default_factory=list)
    stop: bool = False


class LeastLoad:
    """Rank 0's ledger of outstanding tokens per rank, and who holds which request."""

    def __init__(self, world_size: int) -> None:
        self.tokens = [0] * world_size
        self.owner: dict[str, tuple[int, int]] = {}  # request id -> (rank, tokens left)

    def assign(self, request: Request) -> int:
        rank = min(range(len(self.tokens)), key=lambda r: (self.tokens[r], r))
        n = len(request.prompt_ids) + request.params.max_tokens
        self.tokens[rank] += n
        self.owner[request.request_id] = (rank, n)
        return rank

    def account(self, out: StepOutput) -> None:
        if out.request_id not in self.owner:
            return
        rank, left = self.owner[out.request_id]
        used = left if out.finished else min(left, len(out.new_token_ids))
        self.tokens[rank] -= used
        if out.finished:
            del self.owner[out.request_id]
        else:
            self.owner[out.request_id] = (rank, left - used)


def _orders(client: EngineClient, balance: LeastLoad, timeout: float | None,
            stop: threading.Event) -> Orders:
    orders = Orders(stop=stop.is_set())
    for kind, what in client.take_commands(timeout):
        if kind == "add":
            orders.assign.append((balance.assign(what), what))
        elif kind == "abort":
            orders.aborts.append(what)
    return orders


def _stats(prev: EngineStats, reports: list[RankReport], engine: Engine) -> EngineStats:
    """The next snapshot for /metrics: queues now, tokens per expert summed (no more: the
    engine thread holds the GIL that rank 0's HTTP front needs)."""
    step_LE = np.array([r.tokens_per_expert for r in reports], dtype=np.int64).sum(0)
    return EngineStats(
        running=tuple(r.running for r in reports), waiting=tuple(r.waiting for r in reports),
        kv_blocks_used=tuple(r.kv_blocks_used for r in reports),
        kv_blocks_total=engine.scheduler.allocator.num_blocks, steps=engine.steps,
        tokens_LE=step_LE if prev.tokens_LE is None else prev.tokens_LE + step_LE,
        expert_maps=tuple(lay.expert_map for lay in engine.lockstep.layers),  # (rebalancing
        #   replaces them)
        dispatch_bytes=prev.dispatch_bytes + sum(r.remote_bytes for r in reports))


def gather_small(obj, device: torch.device, group, cap: int = 65536) -> list:
    """Every rank's picklable ``obj``, by rank, in one all-gather while each pickles to at
    most ``cap`` bytes (a step's reports, with their [L][E] expert counts, and a few
    requests do; 48 layers of 128 experts pickle to about 19 KB); a second round with
    the longest size otherwise. ``all_gather_object`` always takes two rounds, and each
    round costs about a millisecond on this CPU (gloo's wake-ups)."""
    if group is None:
        return [obj]
    data = pickle.dumps(obj)
    W = dist.get_world_size(group)
    buf = torch.zeros(8 + cap, dtype=torch.uint8)
    buf[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    buf[8 : 8 + min(len(data), cap)] = torch.frombuffer(bytearray(data[:cap]), dtype=torch.uint8)
    out = [torch.empty_like(buf, device=device) for _ in range(W)]
    dist.all_gather(out, buf.to(device), group=group)
    out = [o.cpu() for o in out]  # NOTE: host sync (NCCL), once per step
    sizes = [int(o[:8].view(torch.int64)) for o in out]
    if max(sizes) > cap:  # someone's payload did not fit: everyone sends it whole
        longest = max(sizes)
        full = torch.zeros(longest, dtype=torch.uint8)
        full[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty_like(full, device=device) for _ in range(W)]
        dist.all_gather(parts, full.to(device), group=group)
        return [pickle.loads(p.cpu().numpy().tobytes()[:n]) for p, n in zip(parts, sizes,
                                                                              strict=True)]
    return [pickle.loads(o[8 : 8 + n].numpy().tobytes()) for o, n in zip(out, sizes,
                                                                       strict=True)]


def serve_loop(engine: Engine, state: ParallelState, client: EngineClient | None = None,
               stop: threading.Event | None = None) -> None:
    """Run the engine until rank 0 says stop. Rank 0 passes the ``client`` its HTTP front
    uses; the others pass none. Raises :class:`~epmoe.errors.RankFailure` when a peer fails."""
    leader = state.rank == 0
    stop = stop or threading.Event()
    balance = LeastLoad(state.world_size)
    group = dist.group.WORLD if dist.is_initialized() else None
    world = tuple(range(state.world_size))
    outputs: list[StepOutput] = []
    stepping = False
    while True:
        orders = None
        if leader:
            orders = _orders(client, balance, None if stepping else engine.config.idle_wait_s,
                             stop)
        with guarded(state.heartbeat, "the serving step agreement", world):
            gathered = gather_small((orders, engine.report(outputs)), state.device, group)
        orders = gathered[0][0]
        reports = [g[1] for g in gathered]
        if leader:
            done = [o for r in reports for o in r.outputs]
            for o in done:
                balance.account(o)
            client.deliver(done)
            client.stats = _stats(client.stats, reports, engine)
        if orders.stop:
            return
        outputs = []
        for rank, request in orders.assign:
            if rank == state.rank:
                out = engine.add(request)
                if out is not None:
                    outputs.append(out)
        for rid in orders.aborts:
            out = engine.abort(rid)
            if out is not None:
                outputs.append(out)
        stepping = any(r.has_work for r in reports) or bool(orders.assign)
        if stepping:
            outputs.extend(engine.step())
