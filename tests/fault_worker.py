"""One rank of a fault test, started without torchrun by tests/test_rank_failure.py.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/fault_worker.py \
        --victim 1 --fault KILL --timeout 5

Every rank runs forwards of a small EP layer named "layer 3" in a loop. In
the first forward after 1.5 s of them (a few heartbeats), the victim rank does
its fault between its dispatch and its combine (in the middle of the forward):
KILL or STOP itself, or (SLEEP) sleep there, alive but absent. Every line
printed is one JSON object: the victim's ``{"fault_at": t}`` just before, and each survivor's
``{"rank", "error_type", "error", "at"}`` when its forward fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

import epmoe


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--victim", type=int, default=1)
    p.add_argument("--fault", choices=["KILL", "STOP", "SLEEP"], default="KILL")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--backend", default="alltoall")
    a = p.parse_args()
    torch.set_num_threads(1)
    state = epmoe.init_distributed(force_cpu=True, timeout_s=a.timeout)
    cfg = epmoe.MoEConfig(hidden_size=16, intermediate_size=32, num_experts=2 * state.ep_size,
                          all2all_backend=a.backend, max_tokens_per_rank=8)
    layer = epmoe.ExpertParallelMoE(cfg, state, name="layer 3")
    compute, forwards, start = layer._compute, [0], time.monotonic()

    def faulty_compute(received):
        if state.rank == a.victim and time.monotonic() - start > 1.5 and forwards[0] >= 0:
            forwards[0] = -10**9  # once
            say(fault_at=time.time(), pid=os.getpid())
            if a.fault == "SLEEP":
                time.sleep(3600)
            os.kill(os.getpid(), getattr(signal, f"SIG{a.fault}"))
            time.sleep(3600)  # (STOP: never reached before the test kills it)
        return compute(received)

    layer._compute = faulty_compute
    x = torch.randn(8, 16)
    try:
        while True:
            with torch.no_grad():
                layer(x)
            forwards[0] += 1
            if time.monotonic() - start > 60:
                say(rank=state.rank, error_type=None, error="no fault happened", at=time.time())
                return 1
    except Exception as e:  # the survivors: what they say, and when
        say(rank=state.rank, error_type=type(e).__name__, error=str(e), at=time.time())
        epmoe.health.hard_exit(3)  # as the CLI does: no clean-up of a broken group


if __name__ == "__main__":
    sys.exit(main())
