"""The layer on one process (EP=1, no process group): parity, statistics, bad input."""

import pytest
import torch

import epmoe

CFG = epmoe.MoEConfig(hidden_size=8, intermediate_size=16, num_experts=4, top_k=2)


def layer(**kw):
    return epmoe.ExpertParallelMoE(CFG, epmoe.single_process_state("cpu"), seed=1, **kw)


def test_single_process_layer_is_reference_and_counts_what_it_sent():
    m = layer(collect_stats=True)
    x = torch.randn(10, 8)
    torch.testing.assert_close(m(x), epmoe.reference_moe(x, *epmoe.full_weights(CFG, 1), CFG))
    s = m.last_stats
    assert s.send_rows == [10] and s.recv_rows == [10] and sum(s.tokens_per_expert) == 20
    assert sum(s.recv_per_local_expert) == 20 and set(s.seconds) == {
        "router", "dispatch", "experts", "combine"}
    assert s.dispatch_bytes == [10 * (8 * 4 + 2 * 2 * 4)]
    assert m.expert_weight_bytes() == 4 * 3 * 8 * 16 * 4
    assert m(x[:0]).shape == (0, 8)
    assert m.rows_sent == [10]  # every forward adds the rows it sent


def test_stats_off_by_default():
    m = layer()
    m(torch.randn(3, 8))
    assert m.last_stats is None


def test_load_full_weights_keeps_the_slice():
    weights = epmoe.full_weights(CFG, seed=5)
    m = layer()
    m.load_full_weights(*weights)
    torch.testing.assert_close(m.w_down, weights[3])
    with pytest.raises(ValueError, match=r"w_up has shape \(4, 8, 16\), expected \(4, 16, 8\)"):
        m.load_full_weights(weights[0], weights[1], weights[3], weights[3])
    with pytest.raises(ValueError, match=r"w_gate must hold floating-point values \(it is cast "
                                         r"to torch.float32\), got torch.int64"):
        m.load_full_weights(weights[0], weights[1].long(), weights[2], weights[3])
    with pytest.raises(ValueError, match=r"router_weight must be a torch.Tensor of shape "
                                         r"\(4, 8\), got list"):
        m.load_full_weights([[0.0]], *weights[1:])
    with pytest.raises(ValueError, match="w_down must hold floating-point values .* got a meta"):
        m.load_full_weights(*weights[:3], weights[3].to("meta"))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['router_bias'\]"):
        m.load_full_weights(*weights, router_bias=torch.zeros(4))


@pytest.mark.parametrize("x,match", [
    (torch.randn(4, 7), r"expects x of shape \[T, 8\] \(tokens, hidden_size\), got \(4, 7\)"),
    (torch.randn(2, 4, 8), r"expects x of shape \[T, 8\]"),
    (torch.randn(4, 8, dtype=torch.bfloat16), r"expects x of dtype torch.float32 \(config.dtype\)"),
])
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        layer()(x)


def test_ep_size_larger_than_experts_is_refused():
    with pytest.raises(ValueError, match="num_experts=4 must be >= ep_size=8"):
        epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4).check_ep_size(8)

