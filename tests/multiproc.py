"""Run a function on N local processes joined by gloo, the way torchrun would start them.

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), runs
``fn(*args)`` and sends back its return value. A rank that raises sends its
traceback; a rank that hangs is killed at the deadline. Nothing outlives the call.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks start from a fork server that has imported these once (per test process): a
# rank then starts in milliseconds instead of importing torch and transformers again
# (a spawned interpreter: about 2 s of CPU each, over a few hundred ranks in the suite).
PRELOAD = ["torch", "torch.distributed", "numpy", "safetensors", "transformers", "epmoe",
           "epmoe.hf"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _entry(fn, rank: int, world: int, port: int, args: tuple, results,
           environ: dict[str, str]) -> None:
    os.environ.clear()  # the caller's environment, as a spawned process would have it (the
    os.environ.update(environ)  # fork server's is from when it started)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    import epmoe

    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    try:
        # Serialise here: tensors put on a queue as-is are shared through file
        # descriptors that vanish when this process exits.
        buf = io.BytesIO()
        torch.save(fn(*args), buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        epmoe.destroy_distributed()


class RankFailed(AssertionError):
    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        super().__init__(f"{len(failures)} rank(s) failed:\n{text}")


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, deadline_s: float = 180.0,
              allow_failures: bool = False) -> list[Any]:
    """``fn(*args)`` on ``world`` ranks; returns the results by rank.

    Raises :class:`RankFailed` with every failing rank's traceback (or, with
    ``allow_failures``, returns the traceback string in that rank's place).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, results, environ),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(got) < world and time.monotonic() < end:
            try:
                rank, ok, value = results.get(timeout=0.5)
                got[rank] = (ok, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        killed = set()
        for r, p in enumerate(procs):
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
                killed.add(r)
    import torch

    failures = {r: v for r, (ok, v) in got.items() if not ok}
    got = {r: (ok, torch.load(io.BytesIO(v), weights_only=False) if ok else v)
           for r, (ok, v) in got.items()}
    for r in range(world):
        if r not in got:
            code = procs[r].exitcode
            failures[r] = (f"no result within {deadline_s:.0f} s (killed by the harness)"
                           if r in killed else f"ended without a result, exit code {code}"
                           + (f" (signal {-code})" if code is not None and code < 0 else ""))
    if failures and not allow_failures:
        raise RankFailed(failures)
    return [got[r][1] if r in got else failures[r] for r in range(world)]
