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
