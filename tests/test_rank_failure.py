"""A rank that dies, stalls or wanders off in the middle of a forward.

Three ranks are started without torchrun (its agent would kill the survivors
itself), as plain processes with torchrun's environment; the victim (rank 1, or
rank 0, which serves the store) faults between its dispatch and its combine
(tests/fault_worker.py). Every survivor must end by itself, with an error
naming the victim, within the collective timeout plus the heartbeat's few
intervals, and no process may be left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multiproc import free_port

WORKER = Path(__file__).with_name("fault_worker.py")
TIMEOUT_S = 5.0  # the collective timeout the ranks run with
WORLD = 3


def _run(fault: str, victim: int) -> tuple[float, dict[int, dict], dict[int, int]]:
    """Start the ranks, wait for the survivors; returns (fault time, their reports, codes)."""
    port = free_port()
    procs = []
    for r in range(WORLD):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--fault", fault, "--victim", str(victim),
             "--timeout", str(TIMEOUT_S)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True))
    try:
        survivors = [r for r in range(WORLD) if r != victim]
        deadline = time.monotonic() + 90
        for r in survivors:  # they must end by themselves
            procs[r].wait(timeout=max(1.0, deadline - time.monotonic()))
        codes = {r: procs[r].returncode for r in survivors}
    finally:
        for p in procs:  # the victim (stopped or asleep), and anything left on a failure
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(timeout=30)
    lines = {r: [json.loads(line) for line in p.stdout.read().splitlines() if line.startswith("{")]
             for r, p in enumerate(procs)}
    fault_at = [d["fault_at"] for d in lines[victim] if "fault_at" in d]
    assert fault_at, f"the victim never faulted: {lines}"
    reports = {r: lines[r][-1] for r in survivors}
    assert all(p.poll() is not None for p in procs)  # nothing left behind
    return fault_at[0], reports, codes


@pytest.mark.parametrize("fault,victim,limit_s", [
    ("KILL", 1, 4.0),  # the socket closes at once; the heartbeat confirms within ~4 intervals
    ("STOP", 1, TIMEOUT_S + 3.0),  # nothing closes: the collective's timeout ends it
    ("KILL", 0, 4.0),  # rank 0 serves the rendezvous store: it goes with it
])
def test_survivors_name_the_failed_rank_in_time(fault, victim, limit_s):
    fault_at, reports, codes = _run(fault, victim)
    for r, rep in reports.items():
        took = rep["at"] - fault_at
        print(f"{fault} rank {victim}: rank {r} ended {took:.2f} s later: {rep['error'][:160]}")
        assert codes[r] == 3, rep
        assert rep["error_type"] == "RankFailure", rep
        assert f"rank {victim} " in rep["error"] and "layer 3" in rep["error"], rep["error"]
        assert took < limit_s, f"rank {r} took {took:.1f} s (allowed {limit_s} s)"
    if fault == "STOP":  # the timeout, not earlier
        assert all(rep["at"] - fault_at > TIMEOUT_S - 1 for rep in reports.values())
        assert all("did not answer within 5 s in the combine of layer 3" in rep["error"]
                   for rep in reports.values())


def test_a_rank_elsewhere_is_named_alive_with_where_it_is():
    fault_at, reports, codes = _run("SLEEP", 1)
    for r, rep in reports.items():
        assert codes[r] == 3 and rep["error_type"] == "RankFailure", rep
        assert "every peer is alive" in rep["error"] and \
            "rank 1 in the experts of layer 3" in rep["error"], rep["error"]
        assert TIMEOUT_S - 1 < rep["at"] - fault_at < TIMEOUT_S + 3
