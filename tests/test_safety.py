"""Bad input on one rank raises on every rank; configs compared over the EP group;
non-finite tokens; large forwards in chunks.

Rank 1 gets the bad input, rank 0 a good one: rank 1 must raise its own
error (the full text), rank 0 a PeerInputError naming rank 1, both at once
(far below the collective timeout), and the next forward of both must work.
"""

from __future__ import annotations

import time

import pytest
import torch
from multiproc import run_ranks

import epmoe
from epmoe.errors import InputError, PeerInputError

H, F_, E = 8, 12, 4
TIMEOUT_S = 30.0
BACKENDS = ["alltoall", "allgather_reducescatter", "low_latency"]
# kind -> (rank 1's own message, rank 0's message)
BAD = {
    "shape": ("layer 2 on rank 1 expects x of shape [T, 8] (tokens, hidden_size), got (4, 7)",
              "EP rank 1 could not run the dispatch of layer 2: its input x is not of shape "
              "[T, hidden_size]"),
    "three_dims": ("expects x of shape [T, 8] (tokens, hidden_size), got (2, 4, 8)",
                   "its input x is not of shape [T, hidden_size]"),
    "not_a_tensor": ("x must be a torch.Tensor [T, 8], got list",
                     "its input x is not of shape [T, hidden_size]"),
    "dtype": ("expects x of dtype torch.float32 (config.dtype), got torch.bfloat16",
              "its input x is not of config.dtype"),
    "device": ("expects x on cpu (this rank's device), got meta",
               "its input x is not on its device"),
    "nan": ("the input x has NaN or Inf in 2 of 6 tokens (first: [1, 4])",
            "its input x has NaN or Inf in 2 token(s)"),
    "inf": ("the input x has NaN or Inf in 1 of 6 tokens (first: [5])",
            "its input x has NaN or Inf in 1 token(s)"),
    "router_nan": ("the router scores have NaN or Inf in 6 of 6 tokens (first: [0, 1, 2, 3, 4])"
                   " though the tokens are finite: check router_weight",
                   "its router scores have NaN or Inf in 6 token(s)"),
    "too_many": ("low_latency dispatch: 9 tokens on rank 1 exceed max_tokens_per_rank=8",
                 "it passed 9 tokens, more than config.max_tokens_per_rank"),
}


def _bad_input(kind: str, layer) -> object:
    x = torch.randn(6, H)
    if kind == "shape":
        return torch.randn(4, 7)
    if kind == "three_dims":
        return torch.randn(2, 4, H)
    if kind == "not_a_tensor":
        return [[0.0] * H]
    if kind == "dtype":
        return x.bfloat16()
    if kind == "device":
        return x.to("meta")
    if kind == "nan":
        x[1, 3] = x[4, 0] = float("nan")
    if kind == "inf":
        x[5, 2] = float("-inf")
    if kind == "router_nan":
        with torch.no_grad():
            layer.router_weight[2, 5] = float("nan")
    if kind == "too_many":
        return torch.randn(9, H)
    return x


def _bad_worker(backend: str) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=TIMEOUT_S)
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E,
                          all2all_backend=backend, max_tokens_per_rank=8)
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=3, name="layer 2")
    router = layer.router_weight.detach().clone()
    out = {}
    for kind in BAD:
        x = _bad_input(kind, layer) if state.rank == 1 else torch.randn(6, H)
        t0 = time.monotonic()
        try:
            with torch.no_grad():
                layer(x)
            got = ("no error", "")
        except ValueError as e:
            got = (type(e).__name__, str(e))
        with torch.no_grad():  # the group is still in step: the next forward works
            layer.router_weight.copy_(router)
            good = torch.randn(5, H)
            y = layer(good)
        ref = epmoe.reference_moe(good, *epmoe.full_weights(cfg, seed=3), config=cfg)
        out[kind] = dict(error=got, seconds=time.monotonic() - t0,
                         after_ok=bool(torch.allclose(y, ref, atol=1e-5, rtol=0)))
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def bad_results(request):
    return request.param, run_ranks(_bad_worker, 2, request.param)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_on_one_rank_raises_on_every_rank(bad_results, kind):
    backend, (r0, r1) = bad_results
    if kind == "too_many" and backend != "low_latency":  # only low_latency has a limit
        assert r0[kind]["error"][0] == r1[kind]["error"][0] == "no error"
        return
    own, peer = BAD[kind]
    assert r1[kind]["error"][0] == InputError.__name__ and own in r1[kind]["error"][1], r1[kind]
    assert r0[kind]["error"][0] == PeerInputError.__name__ and peer in r0[kind]["error"][1], \
        r0[kind]
    for r in (r0, r1):
        assert r[kind]["seconds"] < TIMEOUT_S / 3, "an error must not wait for the timeout"
        assert r[kind]["after_ok"], "the forward after the error must work"


def _propagate_worker(backend: str) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=TIMEOUT_S)
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E, top_k=2,
                          all2all_backend=backend, max_tokens_per_rank=8, nonfinite="propagate")
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=3)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(state.rank))
    if state.rank == 1:
        x[2, 1] = float("nan")
    with torch.no_grad():
        y = layer(x)
    return dict(x=x, y=y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_propagate_spoils_only_its_own_token(backend):
    r0, r1 = run_ranks(_propagate_worker, 2, backend)
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E, top_k=2)
    weights = epmoe.full_weights(cfg, seed=3)
    assert not torch.isfinite(r1["y"][2]).any()
    keep = [i for i in range(7) if i != 2]
    for r, rows in ((r0, list(range(7))), (r1, keep)):
        ref = epmoe.reference_moe(r["x"][rows], *weights, config=cfg)
        assert torch.isfinite(r["y"][rows]).all()
        assert (r["y"][rows] - ref).abs().max() <= 1e-5 * ref.abs().max()


def _config_worker() -> str:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=TIMEOUT_S)
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E,
                          top_k=2 + state.rank, placement=("linear", "round_robin")[state.rank])
    try:
        epmoe.ExpertParallelMoE(cfg, state, name="layer 5")
    except ValueError as e:
        return str(e)
    return "no error"


def test_configs_that_differ_between_ranks_fail_on_every_rank_naming_the_fields():
    for msg in run_ranks(_config_worker, 2):
        assert "MoEConfig of layer 5 differs between the ranks of EP group [0, 1]" in msg, msg
        assert "top_k: 2 on rank 0, 3 on rank 1" in msg and \
            "placement: 'linear' on rank 0, 'round_robin' on rank 1" in msg, msg


def _chunk_worker(backend: str, counts: list[int]) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=TIMEOUT_S)
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E, top_k=1,
                          all2all_backend=backend, max_chunk_tokens=4)
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=None)
    router, gate, up, down = epmoe.full_weights(cfg, seed=1)
    router = torch.zeros_like(router)
    router[E - 1] = 1.0  # every (positive) token to the last expert, on the last rank
    layer.load_full_weights(router, gate, up, down)
    x = torch.rand(counts[state.rank], H, generator=torch.Generator().manual_seed(state.rank))
    with torch.no_grad():
        y = layer(x)
    ref = epmoe.reference_moe(x, router, gate, up, down, config=cfg)
    return dict(ok=bool(torch.allclose(y, ref, atol=1e-5, rtol=0)), chunks=layer.chunks,
                peak_rows=layer.peak_rows)


@pytest.mark.parametrize("backend", ["alltoall", "allgather_reducescatter"])
def test_large_forwards_run_in_chunks_that_bound_the_rows_received(backend):
    counts = [22, 3]  # rank 0 needs 6 chunks of 4; rank 1 joins all 6
    r0, r1 = run_ranks(_chunk_worker, 2, backend, counts)
    assert r0["ok"] and r1["ok"]
    assert r0["chunks"] == r1["chunks"] == 6
    # Every token goes to rank 1: per round it receives at most G * max_chunk_tokens rows
    # (4 of rank 0's and its own 3 in the first round), never the 25 tokens at once.
    assert r1["peak_rows"] == 4 + 3


@pytest.mark.parametrize("text,comm", [
    ("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:32492", True),
    ("[../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 5000ms for send", True),
    ("Application timeout caused pair closure", True),  # seen beyond a cut link
    ("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:18851: Connection reset", True),
    ("mat1 and mat2 shapes cannot be multiplied (4x7 and 8x12)", False),
    ("index 9 is out of bounds for dimension 0 with size 4", False),
])
def test_failed_collectives_are_told_from_other_errors(text, comm):
    from epmoe.health import is_comm_error

    assert is_comm_error(RuntimeError(text)) is comm
    assert not is_comm_error(ValueError(text))
