"""The placement algorithm of epmoe.eplb on hand-worked and synthetic loads (no processes)."""

from __future__ import annotations

import pytest
import torch

from epmoe.eplb import (
    balanced_packing,
    balancedness,
    keep_slots,
    rank_loads,
    rebalance_experts,
    replicate_experts,
)


def test_packing_by_hand():
    # heaviest first onto the lightest pack with room: 9 -> A, 7 -> B, 5 -> B, 1 -> A
    pack, rank = balanced_packing(torch.tensor([[5.0, 9.0, 1.0, 7.0]]), 2)
    assert pack.tolist() == [[1, 0, 0, 1]] and rank.tolist() == [[1, 0, 1, 0]]
    with pytest.raises(ValueError, match="4 items do not split into 3 equal packs"):
        balanced_packing(torch.ones(1, 4), 3)


def test_replication_by_hand():
    # 10 per copy first: expert 0 takes both extra copies (10 -> 5 -> 3.33 > 2)
    phy2log, replica, cnt = replicate_experts(torch.tensor([[10.0, 2.0, 1.0, 1.0]]), 6)
    assert phy2log.tolist() == [[0, 1, 2, 3, 0, 0]]
    assert replica.tolist() == [[0, 0, 0, 0, 1, 2]] and cnt.tolist() == [[3, 1, 1, 1]]


def test_global_policy_by_hand():
    load = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    phy2log, log2phy, cnt = rebalance_experts(load, 6, num_groups=1, num_nodes=1, num_gpus=2)
    # copies of expert 0 weigh 3.33 each: two on GPU 0 and one on GPU 1, which takes two 1s
    assert cnt.tolist() == [[3, 1, 1, 1]]
    assert sorted(phy2log[0, :3].tolist()) == [0, 0, 3] and sorted(phy2log[0, 3:].tolist()) == \
        [0, 1, 2]
    for e in range(4):  # log2phy lists exactly the slots holding e
        slots = [p for p in log2phy[0, e].tolist() if p >= 0]
        assert slots == [p for p in range(6) if phy2log[0, p] == e]
    loads = rank_loads(load, phy2log, 2)
    assert torch.allclose(loads, torch.tensor([[10 / 3 * 2 + 1, 10 / 3 + 2]], dtype=torch.float64))


@pytest.mark.parametrize("E,P,groups,nodes,gpus", [
    (16, 16, 4, 2, 4), (16, 24, 4, 2, 4), (64, 72, 8, 2, 4), (12, 18, 3, 2, 6), (8, 8, 1, 1, 2)])
def test_placements_are_complete_and_even(E, P, groups, nodes, gpus):
    load = torch.rand(3, E, generator=torch.Generator().manual_seed(E + P)) * 100
    phy2log, log2phy, cnt = rebalance_experts(load, P, groups, nodes, gpus)
    assert phy2log.shape == (3, P) and cnt.shape == (3, E)
    assert (cnt >= 1).all() and (cnt.sum(1) == P).all()  # every expert at least once
    for layer in range(3):
        counted = torch.bincount(phy2log[layer], minlength=E)
        assert torch.equal(counted, cnt[layer])
        for e in range(E):
            slots = [p for p in log2phy[layer, e].tolist() if p >= 0]
            assert len(slots) == cnt[layer, e] and all(phy2log[layer, p] == e for p in slots)
    if groups % nodes == 0:  # hierarchical: a group's experts all live on one node
        per_node = P // nodes
        for layer in range(3):
            for g in range(groups):
                nodes_of = {p // per_node for p in range(P)
                            if g * (E // groups) <= phy2log[layer, p] < (g + 1) * (E // groups)}
                assert len(nodes_of) == 1


def zipf(E: int, s: float = 1.0) -> torch.Tensor:
    return 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s


def test_zipf_over_64_experts_on_4_ranks_with_8_redundant_is_balanced():
    """The issue's target: Zipf(1.0) over 64 experts, 4 ranks, 8 redundant experts."""
    load = (zipf(64) * 10_000).view(1, 64)
    before = balancedness(rank_loads(load, torch.arange(64).view(1, 64), 4))  # linear, no copies
    phy2log, _, _ = rebalance_experts(load, 72, num_groups=1, num_nodes=1, num_gpus=4)
    after = balancedness(rank_loads(load, phy2log, 4))
    print(f"Zipf(1.0), 64 experts, 4 ranks: balancedness {float(before):.4f} -> "
          f"{float(after):.4f} with 8 redundant experts")
    assert float(before) < 0.5 and float(after) >= 0.9


def test_one_hot_expert_gets_the_copies():
    load = torch.ones(1, 16)
    load[0, 5] = 100.0
    phy2log, _, cnt = rebalance_experts(load, 20, 1, 1, 4)
    assert int(cnt[0, 5]) == 5 and int(cnt.sum()) == 20
    assert len({p // 5 for p in range(20) if phy2log[0, p] == 5}) >= 4  # spread over GPUs


def test_keep_slots_moves_only_what_changed():
    load = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) * 10
    old, _, _ = rebalance_experts(load, 20, 1, 1, 4)
    same = keep_slots(old, rebalance_experts(load, 20, 1, 1, 4)[0], 4)
    assert torch.equal(same, old)  # the same load: nothing moves
    new_load = load.clone()
    new_load[:, 0] *= 50  # expert 0 turns hot
    new = rebalance_experts(new_load, 20, 1, 1, 4)[0]
    kept = keep_slots(old, new, 4)
    for layer in range(2):
        for g in range(4):
            a, b = 5 * g, 5 * g + 5
            assert sorted(kept[layer, a:b].tolist()) == sorted(new[layer, a:b].tolist())
            for s in range(a, b):  # an expert on this GPU before and after keeps its slot
                e = int(old[layer, s])
                if e in new[layer, a:b].tolist() and old[layer, a:b].tolist().count(e) == 1 \
                        and new[layer, a:b].tolist().count(e) == 1:
                    assert int(kept[layer, s]) == e


@pytest.mark.parametrize("args,match", [
    ((torch.ones(4), 8, 1, 1, 2), r"load must be \[layers, experts\]"),
    ((torch.ones(1, 8), 6, 1, 1, 2), r"num_replicas=6 must be >= the 8 experts"),
    ((torch.ones(1, 8), 9, 1, 1, 2), r"a multiple of num_gpus=2"),
    ((torch.ones(1, 8), 8, 3, 1, 2), r"the 8 experts of num_groups=3"),
    ((torch.ones(1, 6), 6, 1, 2, 3), r"num_gpus=3 must be a multiple of num_nodes=2"),
    ((-torch.ones(1, 8), 8, 1, 1, 2), r"loads must be finite and >= 0"),
    ((torch.ones(1, 8), 8, 0, 1, 2), r"num_groups must be a positive int"),
])
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)


def test_simulation_command(capsys):
    from epmoe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eplb", "--experts", "64", "--ranks", "4", "--nodes", "1", "--groups", "1",
              "--redundant", "8", "--layers", "2", "--load", "hot"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "2 layer(s), 64 experts, 4 ranks on 1 node(s), 1 groups, 8 redundant (72 physical)" \
        in out
    assert "18 x 84.0 MiB = 1512.0 MiB with the redundant experts" in out
    after = [float(line.split()[2]) for line in out.splitlines() if line[:5].strip().isdigit()]
    before = [float(line.split()[1]) for line in out.splitlines() if line[:5].strip().isdigit()]
    assert len(after) == 2 and all(b < 0.7 and a > 0.9 for a, b in zip(after, before, strict=True))
    with pytest.raises(SystemExit) as e:
        main(["eplb", "--ranks", "3"])
    assert e.value.code == 2 and "--experts 256 must be a multiple of --ranks 3" in \
        capsys.readouterr().err


def _load_worker(backend: str) -> dict:
    import epmoe

    state = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    cfg = epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=6, top_k=2,
                          all2all_backend=backend, max_tokens_per_rank=9, load_window=2,
                          max_chunk_tokens=4)
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=2)
    counts = []
    for i, T in enumerate([5, 9, 3] if state.rank == 0 else [0, 7, 8]):
        x = torch.randn(T, 8, generator=torch.Generator().manual_seed(10 * i + state.rank))
        with torch.no_grad():
            layer(x)
        ids = epmoe.route(x, layer.router_weight, cfg)[1]
        counts.append(torch.bincount(ids.flatten(), minlength=6))
    return dict(total=layer.load.total(), mine=counts, forwards=layer.load.forwards,
                balance=layer.load.balancedness(layer.expert_map),
                per_rank=layer.load.per_rank(layer.expert_map))


@pytest.mark.parametrize("backend", ["alltoall", "low_latency"])
def test_load_statistics_sum_the_group_over_a_window(backend):
    from multiproc import run_ranks

    r0, r1 = run_ranks(_load_worker, 2, backend)
    want = sum(r["mine"][i] for r in (r0, r1) for i in (1, 2))  # the last 2 forwards
    for r in (r0, r1):
        assert r["forwards"] == 2 and torch.equal(r["total"], want)
        per_rank = torch.tensor([int(want[:3].sum()), int(want[3:].sum())])
        assert torch.equal(r["per_rank"], per_rank.double())
        assert r["balance"] == pytest.approx(float(per_rank.double().mean() / per_rank.max()))
