"""Which rank failed: a heartbeat per rank, and the diagnosis when a collective fails.

gloo tells a rank only that its collective failed ("Connection closed by peer
[127.0.0.1]:32492", "Timed out waiting 10000ms for recv"), never which rank
is to blame. So every rank runs a small daemon thread that, every
``interval`` seconds, bumps its own counter in the rendezvous store (with the
place it is at: "the dispatch of layer 3") and reads everyone else's. When a
collective fails, :func:`guarded` turns the error into a
:class:`~epmoe.errors.RankFailure` that names the ranks whose counter stopped
(dead or stopped processes), the ranks beyond a link that no longer answers
(the store unreachable), or, when every peer is alive, the ones that are
somewhere else in their program.

The thread talks to the store over its own connection, so it never waits
behind the main thread, and it costs two small store requests per interval.
It is started by :func:`epmoe.init_distributed`; nothing in the forward path
touches it except setting a string.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import torch.distributed as dist

from .errors import RankFailure

__all__ = ["Heartbeat", "guarded", "hard_exit", "is_comm_error", "stop_heartbeats"]

PREFIX = "epmoe/heartbeat"
OUTSIDE = "outside epmoe's layers (its own code)"


def is_comm_error(e: BaseException) -> bool:
    """Whether an exception came from a failed collective (not from a bug of ours)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "nccl", "connection", "timed out", "timeout", "socket", "broken pipe",
        "pair closure", "peer"))


# This process's running heartbeats: stopped by destroy_distributed() and at exit (a
# process-wide resource, as the process group itself is).
_RUNNING: set[Heartbeat] = set()


def stop_heartbeats() -> None:
    """Stop every heartbeat of this process (``destroy_distributed`` and ``atexit``)."""
    for hb in list(_RUNNING):
        hb.stop()


atexit.register(stop_heartbeats)


class Heartbeat:
    """This rank's heartbeat thread and its view of everyone else's."""

    def __init__(self, rank: int, world_size: int, timeout_s: float,
                 store_addr: tuple[str, int], node: str) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = min(max(timeout_s / 10, 0.2), 2.0)
        self.stale_after = 3 * self.interval  # no new beat for this long: not answering
        self.store_addr = store_addr
        self.where = OUTSIDE  # set by guarded(); published with every beat
        self._stop = threading.Event()
        now = time.monotonic()
        self._beat = [-1] * world_size  # last counter seen per rank
        self._seen_at = [now] * world_size  # when it last changed (this host's clock)
        self._place = [OUTSIDE] * world_size
        self._store_ok_at = now
        td = datetime.timedelta(seconds=max(2 * self.interval, 1.0))
        self._store = dist.TCPStore(store_addr[0], store_addr[1], is_master=False,
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    wait_for_workers=False)
        # Where every rank runs, for the diagnosis of a cut link (read once, now); every
        # rank's first beat exists before anyone reads it.
        self._store.set(f"{PREFIX}/beat/{rank}", f"0 {OUTSIDE}")
        self._store.set(f"{PREFIX}/node/{rank}", node)
        self.nodes = [self._store.get(f"{PREFIX}/node/{r}").decode() for r in range(world_size)]
        self._store.set_timeout(td)
        self._thread = threading.Thread(target=self._run, name="epmoe-heartbeat", daemon=True)
        self._thread.start()
        _RUNNING.add(self)

    @classmethod
    def for_world(cls, rank: int, world_size: int, timeout_s: float) -> Heartbeat | None:
        """From torchrun's (or env://'s) environment; ``None`` where there is no TCP store."""
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size < 2 or not addr or not port:
            return None
        node = os.environ.get("GROUP_RANK")  # torchrun's node rank
        node = f"node {node}" if node is not None else f"host {socket.gethostname()}"
        try:
            return cls(rank, world_size, timeout_s, (addr, int(port)), node)
        except Exception as e:  # the world runs, only the diagnosis will be plainer
            warnings.warn(f"epmoe: no heartbeat (the store at {addr}:{port} refused a second "
                          f"connection: {e}); a failed rank will not be named", stacklevel=2)
            return None

    def stop(self) -> None:
        """End the thread and let go of its store connection. Joins the thread (at most a
        store timeout): a daemon thread left inside the store's C++ client when the
        interpreter exits can abort the process (``terminate called ...``, exit -6)."""
        self._stop.set()
        _RUNNING.discard(self)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.interval + 2.0)
        if not self._thread.is_alive():
            self._store = None

    def _run(self) -> None:
        keys = [f"{PREFIX}/beat/{r}" for r in range(self.world_size)]
        tick, wait = 0, self.interval
        while not self._stop.wait(wait):
            tick += 1
            try:
                self._store.set(keys[self.rank], f"{tick} {self.where}")
                values = self._store.multi_get(keys)
            except Exception:  # unreachable store: the diagnosis reads its age; retry
                wait = min(5.0, 2 * wait)  # slower, so as not to flood the log
                continue
            wait = self.interval
            now = time.monotonic()
            self._store_ok_at = now
            for r, v in enumerate(values):
                beat, _, place = v.decode().partition(" ")
                if int(beat) != self._beat[r]:
                    self._beat[r], self._seen_at[r], self._place[r] = int(beat), now, place

    # ------------------------------------------------------------------ diagnosis

    def _silent(self, ranks: tuple[int, ...]) -> tuple[list[int], float]:
        """The peers that stopped beating while this rank still reached the store (judged
        at its last contact: when the store itself goes, every peer looks silent), and
        how long ago that contact was."""
        ok_at = self._store_ok_at
        silent = [r for r in ranks
                  if r != self.rank and ok_at - self._seen_at[r] > self.stale_after]
        return silent, time.monotonic() - ok_at

    def failure(self, where: str, error: BaseException, ranks: tuple[int, ...]) -> RankFailure:
        """The :class:`RankFailure` for a collective over ``ranks`` that failed in ``where``.

        Waits at most a few heartbeat intervals for a failed peer to show (a
        closed connection arrives before the peer's heartbeat is missed)."""
        gloo = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        timed_out = "imed out" in gloo or "timeout" in gloo.lower()
        deadline = time.monotonic() + self.stale_after + 2 * self.interval
        while True:
            silent, store_age = self._silent(ranks)
            if silent or store_age > self.stale_after or time.monotonic() > deadline:
                break
            time.sleep(self.interval / 4)
        me = f"(seen from rank {self.rank})"
        how = (f"did not answer within {self.timeout_s:g} s" if timed_out
               else "dropped its connection")
        if store_age > self.stale_after:  # this rank lost the store: a link is down
            far = [r for r in ranks if self.nodes[r] != self.nodes[self.rank]]
            store = (f"the store at {self.store_addr[0]}:{self.store_addr[1]} has not answered "
                     f"for {store_age:.1f} s")
            if far:
                nodes = ", ".join(sorted({self.nodes[r] for r in far}))
                return RankFailure(
                    f"rank{'s' if len(far) > 1 else ''} {_list(far)} on {nodes} {how} in "
                    f"{where}: {store}, so the network to {nodes} is down or its host is gone "
                    f"{me}. gloo: {gloo}", tuple(far))
            return RankFailure(
                f"rank 0 (which serves the store) {how} in {where}: {store}, so its process "
                f"is gone or stopped, or the network to it is down {me}. gloo: {gloo}", (0,))
        if silent:
            now = time.monotonic()
            ages = "; ".join(f"rank {r}: last beat {now - self._seen_at[r]:.1f} s ago, from "
                             f"{self._place[r]}" for r in silent)
            return RankFailure(
                f"rank{'s' if len(silent) > 1 else ''} {_list(silent)} {how} in {where}: "
                f"{'their heartbeats' if len(silent) > 1 else 'its heartbeat'} stopped "
                f"({ages}), so the process died, was stopped (SIGSTOP), or its host is "
                f"unreachable {me}. gloo: {gloo}", tuple(silent))
        others = [r for r in ranks if r != self.rank]
        places = "; ".join(f"rank {r} in {self._place[r]} at its last beat" for r in others)
        return RankFailure(
            f"a collective in {where} failed though every peer is alive: {places}. A rank that "
            f"runs a different number of forwards, or raised outside epmoe, leaves the others "
            f"waiting {me}. gloo: {gloo}", ())


def _list(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


@contextmanager
def guarded(heartbeat: Heartbeat | None, where: str, ranks: tuple[int, ...]) -> Iterator[None]:
    """Run collectives over ``ranks`` (global ranks) in ``where``; a failed one raises
    :class:`RankFailure` naming the failed rank instead of gloo's socket text."""
    if heartbeat is None:
        yield
        return
    before, heartbeat.where = heartbeat.where, where
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, RankFailure) or not is_comm_error(e):
            raise
        raise heartbeat.failure(where, e, ranks) from e
    finally:
        heartbeat.where = before


def hard_exit(code: int) -> NoReturn:
    """End the process at once with ``code``, after flushing stdout and stderr.

    The destructors that run at interpreter exit after torch.distributed was used can
    abort (SIGABRT, exit code -6, "terminate called without an active exception")
    instead of letting the process end with the code it chose: always once a peer or
    the store is gone, and now and then after a clean run too (seen about once in five
    runs of a 2-rank ``python -m epmoe generate`` here, after ``destroy_distributed``).
    Skip them; the CLIs call this once their work and clean-up are done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
