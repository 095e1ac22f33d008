"""The shared-memory all-to-all (epmoe.shm) against gloo's, on 2 and 3 local ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch
from multiproc import run_ranks

import epmoe


def _worker(cap: int) -> dict:
    import torch.distributed as dist

    from epmoe.collectives import all_to_all_v, exchange_counts
    from epmoe.shm import attach, detach, shm_for

    state = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    g, G, r = state.ep_group, state.ep_size, state.ep_rank
    gen = torch.Generator().manual_seed(r)
    cases = []
    for step in range(6):  # zero rows, uneven rows, bf16 and int64 rows
        send = torch.randint(0, 5, (G,), generator=gen) * (step % 3 != 0 or r != 1)
        dtype = torch.bfloat16 if step % 2 else torch.float32
        x = torch.randn(int(send.sum()), 7, generator=gen).to(dtype)
        cases.append((send, x))
    with torch.no_grad():
        want = []
        for send, x in cases:
            recv = exchange_counts(send, g)
            want.append((recv, all_to_all_v(x, send.tolist(), recv.tolist(), g)))
        t = attach(g, cap=cap, timeout_s=10)
        assert shm_for(g) is t and t is not None
        got = []
        for send, x in cases:
            recv = exchange_counts(send, g)
            got.append((recv, all_to_all_v(x, send.tolist(), recv.tolist(), g)))
    with torch.enable_grad():
        assert shm_for(g) is None  # under autograd, gloo
    seq = t.seq
    detach()
    dist.barrier()
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].dtype == b[1].dtype
               for a, b in zip(want, got, strict=True))
    return dict(same=same, seq=seq)


@pytest.mark.parametrize("world, cap", [(2, 1 << 20), (3, 1 << 20), (2, 64)])
def test_shm_all_to_all_equals_gloo(world, cap):
    out = run_ranks(_worker, world, cap, deadline_s=90)
    assert all(o["same"] for o in out)
    assert {o["seq"] for o in out} == {12}  # every collective went through it (or fell back)


def _dead_peer_worker() -> str:
    from epmoe.collectives import exchange_counts
    from epmoe.shm import attach

    state = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    attach(state.ep_group, timeout_s=20)
    if state.rank == 1:
        os._exit(0)  # gone without a word
    t0 = time.monotonic()
    try:
        with torch.no_grad():
            exchange_counts(torch.ones(2, dtype=torch.int64), state.ep_group)
    except RuntimeError as e:
        return f"{time.monotonic() - t0:.1f}s {e}"
    return "no error"


def test_a_dead_peer_is_named_at_once():
    out = run_ranks(_dead_peer_worker, 2, deadline_s=60, allow_failures=True)
    seconds, message = out[0].split("s ", 1)
    assert "peer rank(s) [1] closed" in message and float(seconds) < 5, out[0]
