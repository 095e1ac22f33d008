"""Redundant experts and live rebalancing: the pure pieces by hand, then the layer on
2 and 4 gloo ranks with every backend (copies give the reference's outputs; a
rebalance keeps outputs bitwise and moves only the rows whose expert changed)."""

from __future__ import annotations

import functools

import pytest
import torch
from multiproc import run_ranks

import epmoe
from epmoe.placement import choose_replicas, expert_map, map_of_slots
from epmoe.rebalance import Move, new_placement, plan_moves

# --------------------------------------------------------------------------- pure


def test_redundant_maps_by_hand():
    # each rank's free slots take copies of the previous rank's experts
    m = expert_map(6, 2, "linear", num_redundant=2)
    assert m.phy2log == (0, 1, 2, 3, 3, 4, 5, 0)
    assert m.experts_on(0) == (0, 1, 2, 3) and m.experts_on(1) == (3, 4, 5, 0)
    assert m.owner == (0, 0, 0, 0, 1, 1, 1, 1) and m.local_index == (0, 1, 2, 3) * 2
    assert m.copies() == (2, 1, 1, 2, 1, 1) and m.log2phy()[3] == (3, 4)
    rr = expert_map(6, 2, "round_robin", num_redundant=2)
    assert rr.experts_on(0) == (0, 2, 4, 1) and rr.experts_on(1) == (1, 3, 5, 0)
    m4 = expert_map(8, 4, "linear", num_redundant=4)
    assert [m4.experts_on(g) for g in range(4)] == [(0, 1, 6), (2, 3, 0), (4, 5, 2), (6, 7, 4)]
    # uneven: copies go to the experts with the fewest so far, every expert twice here
    m6 = expert_map(6, 4, "linear", num_redundant=6)
    assert [m6.experts_on(g) for g in range(4)] == [(0, 1, 5), (2, 3, 0), (4, 2, 3), (5, 4, 1)]
    for emap, E in ((m, 6), (rr, 6), (m4, 8), (m6, 6),
                    (expert_map(64, 4, num_redundant=8), 64)):  # uniform routing: even
        assert emap.balancedness(torch.ones(E)) == 1.0
    assert not m.identity and expert_map(6, 2).identity
    # no copies: the old layouts, slot ids are expert ids
    assert expert_map(10, 4, "round_robin").experts_on(1) == (1, 5, 9)
    with pytest.raises(ValueError, match="9 slots do not divide evenly over 2 ranks"):
        expert_map(8, 2, num_redundant=1)


def test_rank_loads_share_a_hot_expert_over_its_copies():
    m = map_of_slots(4, 2, [0, 1, 0, 2, 3, 0])  # expert 0: three copies, two on rank 0
    loads = m.rank_loads(torch.tensor([9.0, 1.0, 2.0, 4.0]))
    assert loads.tolist() == [3 + 1 + 3, 2 + 4 + 3]
    assert m.balancedness(torch.tensor([9.0, 1.0, 2.0, 4.0])) == pytest.approx(8 / 9)
    with pytest.raises(ValueError, match=r"every expert 0..3 .* missing \[3\]"):
        map_of_slots(4, 2, [0, 1, 2, 2])


def test_choose_replicas_splits_each_expert_evenly():
    table, copies = map_of_slots(3, 2, [0, 1, 0, 2]).replica_tables()
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0]])
    slots = choose_replicas(ids, table, copies)
    # the 1st, 3rd choice of expert 0 take slot 0, the 2nd, 4th slot 2; others one slot
    assert slots.tolist() == [[0, 1], [2, 3], [0, 1], [3, 2]]
    assert choose_replicas(ids, table, copies, offset=1)[:, 0].tolist() == [2, 0, 2, 3]
    # a hot expert always in the same slot of the top-k still splits evenly
    gen = torch.Generator().manual_seed(0)
    table, copies = map_of_slots(8, 4, list(range(8)) + [0, 0, 0, 5]).replica_tables()
    ids = torch.stack([torch.zeros(101, dtype=torch.long),
                       torch.randint(1, 8, (101,), generator=gen)], dim=1)
    got = torch.bincount(choose_replicas(ids, table, copies).flatten(), minlength=12)
    assert sorted(got[[0, 8, 9, 10]].tolist()) == [25, 25, 25, 26]
    n5 = int((ids == 5).sum())
    assert abs(int(got[5]) - int(got[11])) <= 1 and int(got[5] + got[11]) == n5


def test_plan_moves_by_hand():
    old = map_of_slots(4, 2, [0, 1, 2, 0, 3, 1])  # rank 0: 0 1 2   rank 1: 0 3 1
    new = map_of_slots(4, 2, [0, 2, 2, 3, 0, 1])  # rank 0: 0 2 2   rank 1: 3 0 1
    moves = plan_moves(old, new)
    assert moves == [
        Move(2, 0, 2, 0, 1),  # rank 0 row 1 takes expert 2 from its own row 2: local copy
        Move(3, 1, 1, 1, 0),  # rank 1 row 0 takes 3 from its row 1
        Move(0, 1, 0, 1, 1),  # rank 1 row 1 takes 0 from its row 0 (read before written)
    ]
    new2 = map_of_slots(4, 2, [3, 1, 2, 0, 2, 1])  # rank 0 needs 3, rank 1 needs 2
    assert plan_moves(old, new2) == [Move(3, 1, 1, 0, 0), Move(2, 0, 2, 1, 1)]
    assert plan_moves(old, old) == []


def test_new_placement_keeps_rows_and_balances():
    old = expert_map(8, 2, "linear", num_redundant=2)  # 0 1 2 3 4 | 4 5 6 7 0
    load = torch.tensor([50.0, 1, 1, 1, 1, 1, 1, 30])
    new = new_placement(old, load, 10)
    assert new.copies()[0] >= 2 and new.balancedness(load) > old.balancedness(load)
    again = new_placement(new, load, 10)  # the same load again: nothing moves
    assert plan_moves(new, again) == []
    # rows that keep their expert stay where they were
    for g in range(2):
        before, after = old.experts_on(g), new.experts_on(g)
        for e in set(before) & set(after):
            assert after.index(e) == before.index(e) or before.count(e) > 1


def test_config_checks():
    with pytest.raises(ValueError, match="rebalance_interval=4 needs load_window > 0"):
        epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, rebalance_interval=4)
    with pytest.raises(ValueError, match="num_redundant_experts must be an int >= 0"):
        epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4,
                        num_redundant_experts=-1)
    cfg = epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=8,
                          num_redundant_experts=3)
    with pytest.raises(ValueError, match="8 \\+ 3 = 11 slots do not divide evenly over "
                                         "ep_size=2 .* could be 0 or 2"):
        cfg.check_ep_size(2)


def test_rebalance_needs_a_load_one_process():
    state = epmoe.single_process_state("cpu")
    cfg = epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4)
    layer = epmoe.ExpertParallelMoE(cfg, state)
    with pytest.raises(ValueError, match="set MoEConfig.load_window > 0"):
        layer.rebalance()
    with pytest.raises(ValueError, match=r"load_E must be a tensor of shape \(4,\)"):
        layer.rebalance(torch.ones(5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        layer.rebalance(torch.tensor([1.0, -1.0, 0.0, 0.0]))


# --------------------------------------------------------------------------- ranks

H, F_, E = 32, 48, 8
BACKENDS = ["alltoall", "allgather_reducescatter", "low_latency"]


def skewed_inputs(cfg: epmoe.MoEConfig, tokens: int, seed: int = 0):
    """Full weights whose router sends most tokens to experts 0 and 7, and the tokens."""
    router, gate, up, down = epmoe.full_weights(cfg, seed=3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen).abs() + 0.05
    router = router.clone()
    router[0] += 0.4
    router[7] += 0.25
    return dict(router_weight=router, w_gate=gate, w_up=up, w_down=down), x


def _rebalance_worker(backend: str, redundant: int, top_k: int, tokens: int,
                      invariant: bool) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    G, me = state.ep_size, state.ep_rank
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E, top_k=top_k,
                          num_redundant_experts=redundant, load_window=4,
                          all2all_backend=backend, max_tokens_per_rank=tokens,
                          batch_invariant=invariant)
    weights, x_all = skewed_inputs(cfg, tokens * G)
    x = x_all[me * tokens : (me + 1) * tokens]
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=None, collect_stats=True)
    layer.load_full_weights(**weights)
    params = {n: (p, p.data_ptr()) for n, p in layer.named_parameters()}
    rows_before = [t.clone() for t in layer.expert_tensors()]
    local_before = layer.local_experts
    with torch.no_grad():
        y0 = layer(x)
        computed0 = sum(layer.last_stats.recv_per_local_expert)
    skipped = layer.rebalance(min_gain=1.0)  # no placement gains that much: nothing moves
    report = layer.rebalance()
    with torch.no_grad():
        y1 = layer(x)
        computed1 = sum(layer.last_stats.recv_per_local_expert)
    # every row holds its new expert's weights; rows that kept their expert were not written
    full = {"w_gate_up": torch.cat([weights["w_gate"], weights["w_up"]], dim=1),
            "w_down": weights["w_down"]}
    rows_ok = all(torch.equal(t[i], full[n][e])
                  for n, t in zip(("w_gate_up", "w_down"), layer.expert_tensors(), strict=True)
                  for i, e in enumerate(layer.local_experts))
    kept = [i for i, (a, b) in enumerate(zip(local_before, layer.local_experts, strict=True))
            if a == b]
    kept_ok = all(torch.equal(t[kept], old[kept])
                  for t, old in zip(layer.expert_tensors(), rows_before, strict=True))
    same_params = all(p is dict(layer.named_parameters())[n] and p.data_ptr() == ptr
                      for n, (p, ptr) in params.items())
    again = layer.rebalance(load_E=layer.load.total())  # a second call: nothing to move
    # the gradient still flows, through copies and the new placement
    xg = x.clone().requires_grad_(True)
    layer(xg).square().sum().backward()
    return dict(y0=y0, y1=y1, report=report, again=again, skipped=skipped, rows_ok=rows_ok,
                kept_ok=kept_ok,
                same_params=same_params, local_before=local_before,
                local_after=layer.local_experts, computed=(computed0, computed1),
                x_grad=xg.grad, load=layer.load.total(),
                row_bytes=sum(t[0].numel() * t.element_size() for t in layer.expert_tensors()))


@functools.cache
def rebalanced(world: int, backend: str, redundant: int, top_k: int = 2, tokens: int = 48,
               invariant: bool = True):
    return run_ranks(_rebalance_worker, world, backend, redundant, top_k, tokens, invariant,
                     deadline_s=300)


def _reference(world: int, redundant: int, top_k: int, tokens: int):
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E, top_k=top_k)
    weights, x_all = skewed_inputs(cfg, tokens * world)
    x = x_all.clone().requires_grad_(True)
    y = epmoe.reference_moe(x, **weights, config=cfg)
    y.square().sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,redundant", [(2, 2), (4, 4)])
def test_rebalance_keeps_outputs_bitwise_and_moves_only_changes(world, backend, redundant):
    ranks = rebalanced(world, backend, redundant)
    ref, ref_grad = _reference(world, redundant, 2, 48)
    y0 = torch.cat([r["y0"] for r in ranks])
    y1 = torch.cat([r["y1"] for r in ranks])
    scale = ref.abs().max()
    assert (y0 - ref).abs().max() <= 1e-5 * scale  # copies: the reference's outputs
    assert torch.equal(y0, y1), f"rebalance changed outputs by {(y0 - y1).abs().max()}"
    grad = torch.cat([r["x_grad"] for r in ranks])
    assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()
    reports = [r["report"] for r in ranks]
    changed = sum(a != b for r in ranks
                  for a, b in zip(r["local_before"], r["local_after"], strict=True))
    assert changed > 0 and all(rep.changed_rows == changed for rep in reports)
    for r in ranks:
        rep = r["report"]
        assert r["rows_ok"] and r["kept_ok"] and r["same_params"]
        assert rep.bytes_received == rep.rows_received * r["row_bytes"]
        # it received exactly the new experts it held no copy of before
        new_here = [e for e, b in zip(r["local_after"], r["local_before"], strict=True)
                    if e != b and e not in r["local_before"]]
        assert rep.rows_received == len(new_here)
        assert r["again"].changed_rows == 0 and r["again"].bytes_received == 0
        assert r["skipped"].changed_rows == 0 and r["skipped"].bytes_sent == 0
    assert sum(rep.rows_sent for rep in reports) == sum(rep.rows_received for rep in reports)
    assert reports[0].balancedness_after > reports[0].balancedness_before
    # the rows the ranks computed are more even after
    c0 = torch.tensor([r["computed"][0] for r in ranks], dtype=torch.float64)
    c1 = torch.tensor([r["computed"][1] for r in ranks], dtype=torch.float64)
    assert float(c1.mean() / c1.max()) > float(c0.mean() / c0.max())


def test_rebalance_without_redundant_experts_re_places_them():
    ranks = rebalanced(2, "alltoall", 0)
    ref, _ = _reference(2, 0, 2, 48)
    y0 = torch.cat([r["y0"] for r in ranks])
    assert (y0 - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(y0, torch.cat([r["y1"] for r in ranks]))
    assert all(len(set(r["local_after"])) == len(r["local_after"]) for r in ranks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rebalance_with_top_k_4_and_few_tokens_is_bitwise_when_batch_invariant(backend):
    # Four choices per token, 5 tokens per rank: a rebalance changes which choices a rank
    # adds up together and how many rows each product takes; with batch_invariant the
    # products take fixed tiles and the sums are carried in float64, rounded once.
    ranks = rebalanced(2, backend, 2, top_k=4, tokens=5)
    ref, _ = _reference(2, 2, 4, 5)
    y0 = torch.cat([r["y0"] for r in ranks])
    assert (y0 - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert sum(r["report"].changed_rows for r in ranks) > 0
    assert torch.equal(y0, torch.cat([r["y1"] for r in ranks]))


def test_rebalance_without_batch_invariance_is_within_rounding():
    # The default: the same values up to fp32 rounding (small products may take other
    # kernels, sums another order), not necessarily the same bits.
    ranks = rebalanced(2, "alltoall", 2, top_k=4, tokens=5, invariant=False)
    ref, _ = _reference(2, 2, 4, 5)
    y0 = torch.cat([r["y0"] for r in ranks])
    y1 = torch.cat([r["y1"] for r in ranks])
    assert (y0 - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (y1 - y0).abs().max() <= 1e-6 * ref.abs().max()


def _interval_worker() -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E, top_k=2,
                          num_redundant_experts=2, load_window=2, rebalance_interval=2)
    weights, x_all = skewed_inputs(cfg, 64)
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=None)
    layer.load_full_weights(**weights)
    x = x_all[state.rank * 32 : (state.rank + 1) * 32]
    seen = []
    for _ in range(5):
        with torch.no_grad():
            y = layer(x)
        seen.append(None if layer.last_rebalance is None else layer.last_rebalance.phy2log)
    return dict(seen=seen, y=y)


def test_rebalance_every_n_forwards():
    r0, r1 = run_ranks(_interval_worker, 2)
    # forwards 1 and 2 fill the window; forward 3 starts with a rebalance, forward 5 too
    assert r0["seen"][:2] == [None, None] and r0["seen"][2] is not None
    assert r0["seen"] == r1["seen"] and r0["seen"][4] is not None


def test_batch_invariant_rows_do_not_depend_on_their_batch():
    from epmoe.experts import ExpertWeights, gated_activation, invariant_experts, run_experts

    cfg = epmoe.MoEConfig(hidden_size=64, intermediate_size=704, num_experts=2)
    gen = torch.Generator().manual_seed(1)
    experts = ExpertWeights(torch.randn(2, 1408, 64, generator=gen) / 8,
                            torch.randn(2, 64, 704, generator=gen) / 26)
    glu = gated_activation(cfg)
    x = torch.randn(300, 64, generator=gen)
    alone = invariant_experts(x[:1], [1, 0], experts, glu)
    crowd = invariant_experts(x, [200, 100], experts, glu)
    assert torch.equal(alone[0], crowd[0])  # the same bits alone and among 199 others
    second = invariant_experts(x[200:203], [0, 3], experts, glu)
    assert torch.equal(second, crowd[200:203])
    loop = run_experts(x, [200, 100], experts, glu, "loop")
    assert torch.allclose(crowd, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_batch_invariant_layer_gives_a_token_the_same_bits_alone(family, dtype):
    extra = dict(top_k=2) if family == "mixtral" else dict(
        top_k=3, scoring="sigmoid", score_correction_bias=True, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, router_fp32=True, shared_intermediate_size=96)
    cfg = epmoe.MoEConfig(hidden_size=64, intermediate_size=704, num_experts=8, dtype=dtype,
                          batch_invariant=True, **extra)
    layer = epmoe.ExpertParallelMoE(cfg, epmoe.single_process_state("cpu"), seed=4)
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(2)).to(cfg.dtype)
    with torch.no_grad():
        y = layer(x)
        for i in (0, 7, 199):
            assert torch.equal(layer(x[i : i + 1])[0], y[i]), i
        assert torch.equal(layer(x[50:90]), y[50:90])
    result = epmoe.compare_to_reference(y, x, *epmoe.full_weights(cfg, seed=4), config=cfg,
                                        **epmoe.full_optional_weights(cfg, seed=4))
    assert result.ok, str(result)
