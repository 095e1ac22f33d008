"""The optional capacity factor: which pairs are dropped (by hand and by property), and the
EP layer with drops against the reference on each rank's tokens, forward and backward,
with every backend; an expert never computes more than ep_size x capacity rows."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

import epmoe
from epmoe.capacity import capacity_keep, expert_capacity


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("seed", range(6))
def test_keep_is_each_experts_best_pairs_up_to_capacity(policy, seed):
    g = torch.Generator().manual_seed(seed)
    T, k, E = 37, 3, 5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[: T // 2, 0] = 0  # a hot expert
    w = torch.rand(T, k, generator=g)
    cap = expert_capacity(T, k, E, 1.0)
    keep = capacity_keep(w, ids, E, cap, policy)
    for e in range(E):
        pairs = [(t, j) for t in range(T) for j in range(k) if ids[t, j] == e]
        if policy == "probs":  # largest weight first, ties by position
            pairs.sort(key=lambda p: (-float(w[p]), p))
        want = set(pairs[:cap])
        got = {p for p in pairs if keep[p]}
        assert got == want, f"expert {e}"
    assert capacity_keep(w, ids, E, T * k, policy).all()  # room for every pair


def test_config_refuses_bad_capacity():
    base = dict(hidden_size=8, intermediate_size=8, num_experts=4)
    for bad in (-1.0, True, "1"):
        with pytest.raises(ValueError, match="capacity_factor must be a number >= 0"):
            epmoe.MoEConfig(**base, capacity_factor=bad)
    with pytest.raises(ValueError, match="drop_policy must be one of"):
        epmoe.MoEConfig(**base, capacity_factor=1.0, drop_policy="random")
    with pytest.raises(ValueError, match="not with batch_invariant"):
        epmoe.MoEConfig(**base, capacity_factor=1.0, batch_invariant=True)


H, COUNTS = 16, [23, 9, 17, 0]


def _config(backend: str, policy: str, redundant: int = 0) -> epmoe.MoEConfig:
    return epmoe.MoEConfig(hidden_size=H, intermediate_size=24, num_experts=4, top_k=2,
                           capacity_factor=1.0, drop_policy=policy, all2all_backend=backend,
                           max_tokens_per_rank=32, num_redundant_experts=redundant,
                           shared_intermediate_size=8)


def _weights(cfg):
    router, gate, up, down = epmoe.full_weights(cfg, seed=3)
    router = router.clone()
    router[0] += 1.5  # expert 0 is hot: most tokens want it, over its capacity
    return dict(router_weight=router, w_gate=gate, w_up=up, w_down=down,
                **epmoe.full_optional_weights(cfg, seed=3))


def _tokens(world: int):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(COUNTS[:world]), H, generator=g) + 0.5
    return x, torch.randn(x.shape, generator=g)


def _worker(backend: str, policy: str, redundant: int) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    cfg = _config(backend, policy, redundant)
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=None, collect_stats=True)
    layer.load_full_weights(**_weights(cfg))
    x_all, probe_all = _tokens(state.world_size)
    start = sum(COUNTS[: state.rank])
    x = x_all[start : start + COUNTS[state.rank]].clone().requires_grad_(True)
    y = layer(x)
    (y * probe_all[start : start + COUNTS[state.rank]]).sum().backward()
    return dict(y=y.detach(), gx=x.grad, dropped=int(layer.dropped),
                recv=layer.last_stats.recv_per_local_expert, local=layer.local_experts,
                g_router=layer.router_weight.grad, g_down=layer.w_down.grad)


@pytest.mark.parametrize("world,backend,policy,redundant", [
    (2, "alltoall", "probs", 0), (3, "alltoall", "position", 0),
    (2, "allgather_reducescatter", "probs", 0), (3, "low_latency", "probs", 0),
    (2, "alltoall", "probs", 2),  # copies of an expert share its capacity
])
def test_ep_with_capacity_equals_the_reference_per_rank(world, backend, policy, redundant):
    ranks = run_ranks(_worker, world, backend, policy, redundant)
    cfg = _config(backend, policy)
    w = {n: t.clone().requires_grad_(True) for n, t in _weights(cfg).items()}
    x_all, probe_all = _tokens(world)
    xs = [b.clone().requires_grad_(True) for b in x_all.split(COUNTS[:world])]
    total = 0.0
    for r, (x, probe) in enumerate(zip(xs, probe_all.split(COUNTS[:world]), strict=True)):
        y = epmoe.reference_moe(x, config=cfg, **w)  # one rank's tokens, its own capacity
        total = total + (y * probe).sum()
        scale = max(float(y.detach().abs().max()), 1e-6) if y.numel() else 1.0
        assert torch.allclose(ranks[r]["y"], y.detach(), atol=1e-5 * scale, rtol=0), f"rank {r}"
        cap = expert_capacity(COUNTS[r], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
        wants = torch.bincount(epmoe.route(x.detach(), w["router_weight"].detach(), cfg)[1]
                               .flatten(), minlength=cfg.num_experts)
        assert ranks[r]["dropped"] == int((wants - cap).clamp(min=0).sum())
    assert sum(r["dropped"] for r in ranks) > 0  # the hot expert was over its capacity
    total.backward()
    for r, got in enumerate(ranks):
        assert torch.allclose(got["gx"], xs[r].grad, atol=1e-5, rtol=1e-4), f"rank {r} dx"
        if not redundant:  # each expert's gradient from the kept pairs of every rank
            want = w["w_down"].grad[list(got["local"])]
            assert torch.allclose(got["g_down"], want, atol=1e-5, rtol=1e-4), f"rank {r} w_down"
        # An expert computes at most ep_size x its capacity rows (copies: shared).
        caps = [expert_capacity(c, cfg.top_k, cfg.num_experts, 1.0) for c in COUNTS[:world]]
        assert max(got["recv"]) <= sum(caps)
    # The router is replicated: each rank's gradient is its own tokens' part.
    g_router = sum(r["g_router"] for r in ranks)
    assert torch.allclose(g_router, w["router_weight"].grad, atol=1e-5, rtol=1e-4)
