"""Routing on hand-worked tensors: logits, scores, top-k and renormalisation."""

import math

import pytest
import torch

from epmoe import MoEConfig, route

# x [T=3, H=2], router [E=3, H=2]: logits t0 [2, 0, 1], t1 [0, 1, 3], t2 [2, 1, 4]
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])


def cfg(**kw):
    return MoEConfig(hidden_size=2, intermediate_size=4, num_experts=3, **kw)


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_softmax_top2_renormalised_is_softmax_of_the_chosen_logits():
    w, ids = route(X, W, cfg(top_k=2))
    assert ids.tolist() == [[0, 2], [2, 1], [2, 0]]
    # two chosen logits a > b renormalise to (sigmoid(a - b), 1 - sigmoid(a - b))
    want = [[sig(1), 1 - sig(1)], [sig(2), 1 - sig(2)], [sig(2), 1 - sig(2)]]
    torch.testing.assert_close(w, torch.tensor(want), rtol=0, atol=1e-6)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64


def test_softmax_without_renormalisation_keeps_full_softmax_mass():
    w, ids = route(X, W, cfg(top_k=2, renormalize=False))
    z = math.e**2 + 1 + math.e
    assert ids[0].tolist() == [0, 2]
    torch.testing.assert_close(w[0], torch.tensor([math.e**2 / z, math.e / z]), rtol=0, atol=1e-6)


def test_sigmoid_scores_per_expert():
    w, ids = route(X, W, cfg(top_k=2, scoring="sigmoid", renormalize=False))
    assert ids.tolist() == [[0, 2], [2, 1], [2, 0]]
    torch.testing.assert_close(w, torch.tensor([[sig(2), sig(1)], [sig(3), sig(1)],
                                                [sig(4), sig(2)]]), rtol=0, atol=1e-6)
    w2, _ = route(X, W, cfg(top_k=2, scoring="sigmoid", renormalize=True))
    torch.testing.assert_close(w2[0], torch.tensor([sig(2), sig(1)]) / (sig(2) + sig(1)))


@pytest.mark.parametrize("k", [1, 3])
def test_top1_and_all(k):
    w, ids = route(X, W, cfg(top_k=k))
    assert ids.shape == (3, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    if k == 1:
        assert ids.squeeze(1).tolist() == [0, 2, 2]


def test_zero_tokens():
    w, ids = route(X[:0], W, cfg(top_k=2))
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def logit(p):
    return math.log(p / (1 - p))


# One token, H = 1: the router weight column is the logits. Sigmoid scores
# e0 0.8, e1 0.7 (group A, top-2 sum 1.5) and e2 0.9, e3 0.1 (group B, sum 1.0).
ONE = torch.tensor([[1.0]])
W_GROUPS = torch.tensor([[logit(0.8)], [logit(0.7)], [logit(0.9)], [logit(0.1)]])


def grouped(**kw):
    return MoEConfig(hidden_size=1, intermediate_size=1, num_experts=4, top_k=2,
                     scoring="sigmoid", n_group=2, topk_group=1, **kw)


def test_group_limited_top2_sum_picks_the_best_group_not_the_best_expert():
    w, ids = route(ONE, W_GROUPS, grouped())
    assert ids.tolist() == [[0, 1]]  # group A wins on its top-2 sum though e2 is the best
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.7]]) / 1.5, rtol=0, atol=1e-6)
    plain = MoEConfig(hidden_size=1, intermediate_size=1, num_experts=4, top_k=2,
                      scoring="sigmoid")
    assert route(ONE, W_GROUPS, plain)[1].tolist() == [[2, 0]]


def test_group_max_scoring_picks_the_group_of_the_best_expert():
    _, ids = route(ONE, W_GROUPS, grouped(group_scoring="max"))
    assert ids.tolist() == [[2, 3]]


def test_correction_bias_steers_the_choice_but_not_the_weights():
    bias = torch.tensor([0.0, 0.0, 0.0, 0.75])  # e3 chooses as 0.85: group B sums 1.75
    w, ids = route(ONE, W_GROUPS, grouped(score_correction_bias=True, routed_scaling_factor=2.5),
                   score_correction_bias_E=bias)
    assert ids.tolist() == [[2, 3]]
    # weights from the unbiased scores 0.9 and 0.1, renormalised, times 2.5
    torch.testing.assert_close(w, torch.tensor([[2.25, 0.25]]), rtol=0, atol=1e-6)


def test_router_bias_and_scaling_without_renormalisation():
    cfg = MoEConfig(hidden_size=1, intermediate_size=1, num_experts=4, top_k=2,
                    router_bias=True, routed_scaling_factor=2.0, renormalize=False)
    w, ids = route(ONE, torch.zeros(4, 1), cfg, router_bias_E=torch.tensor([1.0, 2.0, 3.0, 0.0]))
    assert ids.tolist() == [[2, 1]]
    z = math.e + math.e**2 + math.e**3 + 1
    torch.testing.assert_close(w, 2.0 * torch.tensor([[math.e**3 / z, math.e**2 / z]]))
