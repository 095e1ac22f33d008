"""Dispatch and combine index logic, and local expert compute, on hand-worked tensors.

E = 4 experts on G = 2 ranks (linear): owner [0, 0, 1, 1], local index [0, 1, 0, 1].
Tokens and their top-2 experts: t0 -> (0, 3), t1 -> (1, 0), t2 -> (2, 3), t3 -> (3, 1).
So t0 needs ranks {0, 1}, t1 only rank 0 (both its experts there), t2 only rank 1,
t3 ranks {0, 1}.
"""

import pytest
import torch

import epmoe
from epmoe.dispatch import pack_rows, pair_hits, plan_dispatch
from epmoe.experts import (
    ExpertWeights,
    gated_activation,
    local_experts_forward,
    sort_by_local_expert,
)
from epmoe.ops import sum_rows

OWNER = torch.tensor([0, 0, 1, 1])
LOCAL = torch.tensor([0, 1, 0, 1])
IDS = torch.tensor([[0, 3], [1, 0], [2, 3], [3, 1]])
WTS = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.8, 0.2]])


def test_pair_hits_and_plan():
    hits = pair_hits(IDS, OWNER, 2)
    assert hits.tolist() == [[True, True], [True, False], [False, True], [True, True]]
    assert hits.sum(0).tolist() == [3, 3]  # a token goes to a rank once, however many experts
    token, dest, slot = plan_dispatch(hits, 6)
    # rank 0 gets t0, t1, t3; rank 1 gets t0, t2, t3 (grouped by rank, tokens ascending)
    assert token.tolist() == [0, 1, 3, 0, 2, 3]
    assert dest.tolist() == [0, 0, 0, 1, 1, 1]
    # a token's pairs are numbered by rank: t0 and t3 have slot 1 on rank 1
    assert slot.tolist() == [0, 0, 0, 1, 0, 1]


def test_pack_rows_keeps_only_the_destinations_experts():
    token, dest, _ = plan_dispatch(pair_hits(IDS, OWNER, 2), 6)
    local, w = pack_rows(token, dest, WTS, IDS, OWNER, LOCAL)
    assert local.tolist() == [[0, -1], [1, 0], [-1, 1], [-1, 1], [0, 1], [1, -1]]
    torch.testing.assert_close(w, torch.tensor(
        [[0.6, 0.0], [0.9, 0.1], [0.0, 0.2], [0.0, 0.4], [0.5, 0.5], [0.8, 0.0]]))


def test_sort_by_local_expert():
    # rank 0 receives rows t0, t1, t3 with local ids [[0,-1],[1,0],[-1,1]]
    pair, counts = sort_by_local_expert(torch.tensor([[0, -1], [1, 0], [-1, 1]]), 2)
    assert counts == [2, 2]
    assert pair.tolist() == [0, 3, 2, 5]  # expert 0: (row0,slot0), (row1,slot1); expert 1: ...
    pair, counts = sort_by_local_expert(torch.tensor([[-1, -1]]), 3)
    assert pair.tolist() == [] and counts == [0, 0, 0]


def test_sum_pairs_returns_each_token_once_in_place():
    token, _, slot = plan_dispatch(pair_hits(IDS, OWNER, 2), 6)
    back = torch.tensor([[1.0], [2.0], [3.0], [10.0], [20.0], [30.0]])
    y = sum_rows(back, token, slot, num_rows=4, num_slots=2)
    assert y.squeeze(1).tolist() == [11.0, 2.0, 20.0, 33.0]


def test_local_experts_forward_by_hand():
    H, F = 3, 5
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(2, F, H, generator=g), torch.randn(2, F, H, generator=g), \
        torch.randn(2, H, F, generator=g)
    x = torch.randn(3, H, generator=g)
    ids = torch.tensor([[0, -1], [1, 0], [-1, 1]])
    w = torch.tensor([[0.6, 0.0], [0.9, 0.1], [0.0, 0.2]])
    glu = gated_activation(epmoe.MoEConfig(hidden_size=H, intermediate_size=F, num_experts=2))
    experts = ExpertWeights(torch.cat([gate, up], dim=1), down)
    y, counts = local_experts_forward(x, ids, w, experts, glu, "loop")
    assert counts == [2, 2]

    def f(n, e):
        h = x[n : n + 1]
        return ((torch.nn.functional.silu(h @ gate[e].T) * (h @ up[e].T)) @ down[e].T)[0]

    want = torch.stack([0.6 * f(0, 0), 0.9 * f(1, 1) + 0.1 * f(1, 0), 0.2 * f(2, 1)])
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("bias", [False, True])
def test_fixed_shape_experts_equal_the_counted_ones_forward_and_backward(bias):
    """The no-host-sync expert path (low_latency on accelerators), here on the CPU."""
    from epmoe.experts import local_experts_forward_fixed

    g = torch.Generator().manual_seed(3)
    e, H, F, N, k = 3, 16, 8, 11, 2
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F, num_experts=e)
    glu = gated_activation(cfg)
    ids = torch.randint(-1, e, (N, k), generator=g)
    ids[2] = -1  # a padding row
    w = torch.rand(N, k, generator=g)

    def run(fn):
        x = torch.randn(N, H, generator=torch.Generator().manual_seed(4)).requires_grad_()
        gu = (0.3 * torch.randn(e, 2 * F, H, generator=torch.Generator().manual_seed(5)))
        dn = (0.3 * torch.randn(e, H, F, generator=torch.Generator().manual_seed(6)))
        bs = [0.1 * torch.randn(e, n, generator=torch.Generator().manual_seed(7)) for n in
              (2 * F, H)] if bias else [None, None]
        leaves = [t.requires_grad_() for t in [gu, dn, *bs] if t is not None]
        experts = ExpertWeights(gu, dn, *bs)
        y = fn(x, ids, w, experts)
        (y * torch.arange(H)).sum().backward()
        return [y.detach(), x.grad] + [t.grad for t in leaves]

    fixed = run(lambda *a: local_experts_forward_fixed(*a, glu))
    counted = run(lambda *a: local_experts_forward(*a, glu, "loop")[0])
    for a, b in zip(fixed, counted, strict=True):
        torch.testing.assert_close(a, b)
