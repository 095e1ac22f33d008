"""Process groups, differentiable collectives, agreement at init, and timeouts."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

import epmoe
from epmoe import all_gather_v, all_to_all_v, exchange_counts, group_layout


def test_group_layout_worked_example():
    ep, dp = group_layout(8, 4)
    assert ep == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dp == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_layout(3, 3) == ([[0, 1, 2]], [[0], [1], [2]])
    assert group_layout(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match=r"ep_size=3 must divide the world size 8; allowed: "
                                         r"\[1, 2, 4, 8\]"):
        group_layout(8, 3)


def test_plain_python_is_a_single_process_state(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    s = epmoe.init_distributed(force_cpu=True)
    assert (s.rank, s.world_size, s.ep_size, s.dp_size, s.backend) == (0, 1, 1, 1, None)
    assert s.ep_group is None and s.device == torch.device("cpu") and not dist.is_initialized()
    with pytest.raises(ValueError, match="ep_size=2 needs 2 processes"):
        epmoe.init_distributed(ep_size=2)
    epmoe.destroy_distributed()  # harmless without a process group


@pytest.mark.parametrize("kw,match", [
    (dict(backend="mpi"), r"backend must be None \(choose\), 'nccl' or 'gloo'"),
    (dict(timeout_s=0), "timeout_s must be > 0"),
    (dict(ep_size=0), "ep_size must be a positive int"),
])
def test_init_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        epmoe.init_distributed(**kw)


def _collectives_worker() -> dict:
    s = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    r, G = s.ep_rank, s.ep_size
    # rank r sends (r + j) % 3 rows to rank j (some zero), row value = 10 * r + j
    send = [(r + j) % 3 for j in range(G)]
    x = torch.cat([torch.full((n, 2), 10.0 * r + j) for j, n in enumerate(send)])
    x.requires_grad_(True)
    recv = exchange_counts(torch.tensor(send), s.ep_group).tolist()
    y = all_to_all_v(x, send, recv, s.ep_group)
    scale = torch.arange(1, y.shape[0] + 1, dtype=torch.float32).unsqueeze(1)
    (y * scale).sum().backward()
    # all-gather of uneven rows: rank r contributes r rows of value r (rank 0 none)
    z = torch.full((r, 3), float(r), requires_grad=True)
    gathered, sizes = all_gather_v(z, s.ep_group)
    (gathered * (1 + torch.arange(gathered.shape[0])).unsqueeze(1)).sum().backward()
    return dict(recv=recv, y=y.detach(), x_grad=x.grad, send=send, gathered=gathered.detach(),
                sizes=sizes, z_grad=z.grad, ep_ranks=s.ep_ranks, dp_ranks=s.dp_ranks)


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_v_and_all_gather_v_forward_and_backward(world):
    out = run_ranks(_collectives_worker, world)
    for r, o in enumerate(out):
        assert o["ep_ranks"] == tuple(range(world)) and o["dp_ranks"] == (r,)
        # received blocks by source rank i: o["recv"][i] rows of value 10 * i + r
        assert o["recv"] == [out[i]["send"][r] for i in range(world)]
        want = torch.cat([torch.full((n, 2), 10.0 * i + r) for i, n in enumerate(o["recv"])])
        assert torch.equal(o["y"], want)
        assert o["sizes"] == list(range(world))
        assert torch.equal(o["gathered"][:, 0], torch.cat(
            [torch.full((i,), float(i)) for i in range(world)]))
    # Backward of the all-to-all: each sent row gets the grad (its position + 1 on the
    # receiver) back; backward of the all-gather: every rank's rows, summed over ranks.
    for r, o in enumerate(out):
        grads = []
        for j in range(world):  # rows sent to j sit, on j, after the blocks of ranks < r
            before = sum(out[i]["send"][j] for i in range(r))
            grads.append(torch.arange(before + 1, before + o["send"][j] + 1, dtype=torch.float32))
        assert torch.equal(o["x_grad"][:, 0], torch.cat(grads))
        start = sum(range(r))
        want = world * (1 + torch.arange(start, start + r, dtype=torch.float32))
        assert torch.equal(o["z_grad"][:, 0], want)


def _dp_worker() -> dict:
    s = epmoe.init_distributed(force_cpu=True, ep_size=2, timeout_s=30)
    cfg = epmoe.MoEConfig(hidden_size=16, intermediate_size=24, num_experts=5, top_k=2)
    layer = epmoe.ExpertParallelMoE(cfg, s, seed=3)
    x = torch.randn(6 + s.rank, 16, generator=torch.Generator().manual_seed(s.rank))
    with torch.no_grad():
        y = layer(x)
    return dict(x=x, y=y, state=(s.ep_rank, s.ep_size, s.dp_rank, s.dp_size, s.ep_ranks,
                                 s.dp_ranks), local=layer.local_experts)


def test_dp_times_ep_world_of_four():
    """ep_size=2 on 4 ranks: two EP groups, each one whole copy of the layer."""
    out = run_ranks(_dp_worker, 4)
    assert [o["state"] for o in out] == [
        (0, 2, 0, 2, (0, 1), (0, 2)), (1, 2, 0, 2, (0, 1), (1, 3)),
        (0, 2, 1, 2, (2, 3), (0, 2)), (1, 2, 1, 2, (2, 3), (1, 3))]
    assert [o["local"] for o in out] == [(0, 1, 2), (3, 4), (0, 1, 2), (3, 4)]
    cfg = epmoe.MoEConfig(hidden_size=16, intermediate_size=24, num_experts=5, top_k=2)
    weights = epmoe.full_weights(cfg, seed=3)
    for o in out:
        ref = epmoe.reference_moe(o["x"], *weights, cfg)
        assert (o["y"] - ref).abs().max() <= 1e-5 * ref.abs().max()


def _disagree_worker():
    rank = int(__import__("os").environ["RANK"])
    epmoe.init_distributed(force_cpu=True, ep_size=[2, 1][rank], timeout_s=20)


def test_ranks_that_disagree_fail_clearly():
    out = run_ranks(_disagree_worker, 2, allow_failures=True, deadline_s=60)
    for text in out:
        assert "ranks disagree on the parallel layout" in text
        assert "rank 0: world_size=2 ep_size=2, rank 1: world_size=2 ep_size=1" in text


def _timeout_worker() -> float:
    s = epmoe.init_distributed(force_cpu=True, timeout_s=3)
    if s.rank == 1:
        time.sleep(8)  # never joins the all-to-all
        return -1.0
    t0 = time.monotonic()
    try:
        all_to_all_v(torch.ones(2, 2), [1, 1], [1, 1], s.ep_group)
    except RuntimeError:
        return time.monotonic() - t0
    raise AssertionError("the all-to-all returned without its peer")


def test_a_collective_is_bounded_by_the_timeout():
    waited = run_ranks(_timeout_worker, 2, deadline_s=60)[0]
    assert 2.5 <= waited <= 8.0, waited


def _preinitialised_worker() -> tuple:
    dist.init_process_group("gloo")  # the caller started the world itself
    s = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    return s.backend, s.ep_size, s.device.type


def test_init_joins_a_process_group_the_caller_started():
    assert run_ranks(_preinitialised_worker, 2) == [("gloo", 2, "cpu")] * 2
