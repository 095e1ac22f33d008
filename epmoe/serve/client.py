"""Rank 0's bridge between the HTTP front (an asyncio event loop) and the engine thread.

The front calls :meth:`EngineClient.generate` and iterates over the request's
:class:`~epmoe.serve.types.StepOutput` objects as the engine produces them.
Commands go to the engine thread through a thread-safe queue; outputs come
back with ``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per request.
Closing the iterator early (a client that disconnected, a stop string found)
aborts the request in the engine, which frees its KV-cache blocks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import torch

from .types import EngineDead, QueueFull, Request, StepOutput

__all__ = ["EngineClient", "EngineStats"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for ``/metrics``, written by the engine thread after each step; what costs
    more than an addition (balancedness) is computed when read, at scrape time. Lists
    indexed by rank are ``[W]``; by MoE layer ``[L]``."""

    running: tuple[int, ...] = ()  # [W] requests in the running batch of each rank
    waiting: tuple[int, ...] = ()  # [W] requests admitted to a rank but not yet running
    kv_blocks_used: tuple[int, ...] = ()  # [W]
    kv_blocks_total: int = 0  # per rank
    steps: int = 0  # engine steps (model forwards of the group) so far
    tokens_LE: np.ndarray | None = None  # [L, E] token choices per expert, group-wide, so far
    expert_maps: tuple = ()  # [L] each MoE layer's ExpertMap (who holds which expert)
    # bytes of token rows all ranks put on the wire to other ranks in dispatch and got
    # back in combine, cumulative (each MoE layer's rows_sent)
    dispatch_bytes: int = 0

    @property
    def tokens_per_expert(self) -> list[list[int]]:  # [L][E]
        return [] if self.tokens_LE is None else self.tokens_LE.tolist()

    @property
    def balancedness(self) -> tuple[float, ...]:
        """[L] mean over max of the rows each rank's experts computed (1.0: even)."""
        if self.tokens_LE is None:
            return ()
        return tuple(m.balancedness(torch.from_numpy(row[: m.num_experts]))
                     for m, row in zip(self.expert_maps, self.tokens_LE, strict=True))


class EngineClient:
    """Thread-safe front of the engine for rank 0's event loop.

    ``max_pending`` bounds the requests in flight (running, waiting, queued); past
    it :meth:`generate` raises :class:`QueueFull` at once (the front answers 429).
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.commands: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Request) | ("abort", id)
        self.stats = EngineStats()
        self.dead: str | None = None  # why the engine stopped, once it has
        self._streams: dict[str, asyncio.Queue] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, request: Request) -> AsyncIterator[StepOutput]:
        """The request's outputs, step by step, until one with ``finished``.
        Raises :class:`QueueFull` or :class:`EngineDead` before the first output."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        self._loop = asyncio.get_running_loop()
        rid = request.request_id
        with self._lock:
            if len(self._streams) >= self.max_pending:
                raise QueueFull(f"{len(self._streams)} requests in flight, the limit is "
                                f"{self.max_pending}")
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in flight")
            q = self._streams[rid] = asyncio.Queue()
        self.commands.put(("add", request))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished and self.dead is None:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    # ------------------------------------------------------------ engine thread side

    def take_commands(self, timeout: float | None) -> list[tuple[str, object]]:
        """Everything queued; waits up to ``timeout`` seconds for the first (None: no wait)."""
        out = []
        try:
            out.append(self.commands.get(timeout=timeout) if timeout else
                       self.commands.get_nowait())
            while True:
                out.append(self.commands.get_nowait())
        except queue.Empty:
            pass
        return out

    def deliver(self, outputs: list[StepOutput]) -> None:
        loop = self._loop
        if loop is None or not outputs:
            return
        with self._lock:
            targets = [(self._streams.get(o.request_id), o) for o in outputs]
        for q, o in targets:
            if q is not None:
                loop.call_soon_threadsafe(q.put_nowait, o)

    def fail_all(self, reason: str) -> None:
        """The engine is gone: every stream raises :class:`EngineDead` (503)."""
        self.dead = reason
        loop = self._loop
        with self._lock:
            streams = list(self._streams.values())
        for q in streams:
            if loop is not None:
                loop.call_soon_threadsafe(q.put_nowait, EngineDead(reason))
