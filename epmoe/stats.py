"""Per-forward statistics of an MoE layer: what it routed, sent and spent time on.

Collected only when the layer's ``collect_stats`` is on; then the timers
synchronise the device at each phase boundary (so the times are real), and
nothing is synchronised or counted when it is off.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .placement import ExpertMap

__all__ = ["ExpertLoad", "MoEStats", "PhaseTimer", "forward_stats"]

PHASES = ("router", "dispatch", "experts", "combine")  # and "shared" when it runs after


@dataclass(frozen=True)
class MoEStats:
    """One forward on one rank. Lists indexed by EP rank are ``[G]``."""

    tokens: int  # tokens this rank routed
    tokens_per_expert: list[int]  # [E] this rank's token choices per global expert
    recv_per_local_expert: list[int]  # [e] (row, expert) pairs computed per local expert
    send_rows: list[int]  # [G] token rows put on the wire to each rank (self's stay local)
    recv_rows: list[int]  # [G] token rows received from each rank
    dispatch_bytes: list[int]  # [G] bytes sent to each rank in dispatch (tokens + ids/weights)
    combine_bytes: list[int]  # [G] bytes sent to each rank in combine (partial outputs)
    needed_rows: list[int] = field(default_factory=list)  # [G] this rank's tokens with an
    #   expert on each rank: the least any backend must send there (send_rows >= it)
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, see PHASES


class PhaseTimer:
    """Wall time per phase; a no-op unless enabled. Syncs CUDA so GPU work is counted."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
            self._t = now

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # NOTE: host sync, only when statistics are on


class ExpertLoad:
    """Tokens per logical expert over the last ``window`` forwards, summed over the EP group
    (every rank's tokens, not only those routed to this rank's experts): the load that
    expert-parallel load balancing (``epmoe.eplb``) places experts from. The layer keeps
    one when ``MoEConfig.load_window > 0`` (one all-reduce of ``[E]`` counts per forward);
    none when it is 0."""

    def __init__(self, num_experts: int, window: int) -> None:
        if window < 1:
            raise ValueError(f"ExpertLoad window must be >= 1 forwards, got {window}")
        self.num_experts, self.window = num_experts, window
        self._counts: deque[Tensor] = deque(maxlen=window)

    def add(self, counts_E: Tensor) -> None:
        """One forward's group-wide tokens per expert ``[E]``."""
        self._counts.append(counts_E.detach().to("cpu", torch.int64))

    @property
    def forwards(self) -> int:
        return len(self._counts)

    def total(self) -> Tensor:
        """Tokens per expert ``[E]`` summed over the window (int64, on the CPU)."""
        if not self._counts:
            return torch.zeros(self.num_experts, dtype=torch.int64)
        return torch.stack(list(self._counts)).sum(0)

    def per_rank(self, expert_map: ExpertMap) -> Tensor:
        """Tokens per EP rank ``[G]`` (float64) over the window, placed by ``expert_map``
        (a replicated expert's load shared evenly by its copies)."""
        return expert_map.rank_loads(self.total())

    def balancedness(self, expert_map: ExpertMap) -> float:
        """Mean over max of the tokens per rank (1.0: perfectly even; 1.0 with no tokens)."""
        return expert_map.balancedness(self.total())


def forward_stats(ids_TK: Tensor, slots_TK: Tensor, owner_P: Tensor, num_experts: int,
                  ep_size: int, num_local: int, wire, counts: list[int] | None,
                  local_ids_NK: Tensor, seconds: dict[str, float]) -> MoEStats:
    """One forward's :class:`MoEStats` from its routing (expert ids and slot ids ``[T, k]``),
    the dispatch's :class:`~epmoe.dispatch.Wire` and the rows each local expert computed
    (``counts``; ``None`` after the fixed-shape path, then counted from ``local_ids_NK``).
    Only when ``collect_stats`` is on: a bincount or two and their host syncs."""
    T = ids_TK.shape[0]
    per_expert = torch.bincount(ids_TK.flatten(), minlength=num_experts)
    if counts is None:
        counts = torch.bincount(local_ids_NK[local_ids_NK >= 0], minlength=num_local).tolist()
    hits = torch.zeros((T, ep_size + 1), dtype=torch.bool, device=ids_TK.device)
    hits = hits.scatter_(1, owner_P[slots_TK], True)[:, :ep_size]  # (ep_size: dropped pairs)
    return MoEStats(
        tokens=T,
        tokens_per_expert=per_expert.tolist(),
        recv_per_local_expert=list(counts),
        send_rows=list(wire.send_rows),
        recv_rows=list(wire.recv_rows),
        dispatch_bytes=list(wire.dispatch_bytes),
        combine_bytes=list(wire.combine_bytes),
        needed_rows=hits.sum(0).tolist(),
        seconds=dict(seconds),
    )
