"""Per-forward statistics of an MoE layer: what it routed, sent and spent time on.

Collected only when the layer's ``collect_stats`` is on; then the timers
synchronise the device at each phase boundary (so the times are real), and
nothing is synchronised or counted when it is off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["MoEStats", "PhaseTimer"]

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
