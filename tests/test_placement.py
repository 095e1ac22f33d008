"""expert_map: owner and local index of every global expert, even and uneven."""

import pytest

from epmoe import expert_map


def test_linear_even():
    m = expert_map(8, 2, "linear")
    assert m.owner == (0, 0, 0, 0, 1, 1, 1, 1)
    assert m.local_index == (0, 1, 2, 3, 0, 1, 2, 3)
    assert m.experts_on(0) == (0, 1, 2, 3) and m.experts_on(1) == (4, 5, 6, 7)


def test_linear_uneven_first_ranks_hold_one_more():
    m = expert_map(10, 4, "linear")
    assert [m.experts_on(r) for r in range(4)] == [(0, 1, 2), (3, 4, 5), (6, 7), (8, 9)]
    assert m.local_index == (0, 1, 2, 0, 1, 2, 0, 1, 0, 1)


def test_round_robin_uneven():
    m = expert_map(10, 4, "round_robin")
    assert [m.experts_on(r) for r in range(4)] == [(0, 4, 8), (1, 5, 9), (2, 6), (3, 7)]
    assert m.owner == (0, 1, 2, 3, 0, 1, 2, 3, 0, 1)
    assert m.local_index == (0, 0, 0, 0, 1, 1, 1, 1, 2, 2)


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("E,G", [(1, 1), (7, 3), (8, 8), (64, 5), (9, 2)])
def test_every_expert_once_and_counts(placement, E, G):
    m = expert_map(E, G, placement)
    held = [m.experts_on(r) for r in range(G)]
    assert sorted(e for h in held for e in h) == list(range(E))
    assert [len(h) for h in held] == [E // G + (1 if r < E % G else 0) for r in range(G)]
    for r, h in enumerate(held):
        assert [m.local_index[e] for e in h] == list(range(len(h)))
        assert all(m.owner[e] == r for e in h) and m.num_local(r) == len(h)
    assert m.owner_tensor().tolist() == list(m.owner)


def test_errors():
    with pytest.raises(ValueError, match="num_experts=2 must be >= ep_size=3"):
        expert_map(2, 3)
    with pytest.raises(ValueError, match=r"placement must be one of \['linear', 'round_robin'\]"):
        expert_map(4, 2, "striped")
