"""The reference itself, and the comparison the tests and the demo use."""

import torch
import torch.nn.functional as F

import epmoe


def test_reference_by_hand_top1():
    # 2 experts, H=2, F=1; the router picks expert 1 for x = [1, 0] (logits 0 vs 3).
    cfg = epmoe.MoEConfig(hidden_size=2, intermediate_size=1, num_experts=2, top_k=1)
    router = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    gate = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]])  # [E, F, H]
    up = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]]])
    down = torch.tensor([[[1.0], [1.0]], [[1.0], [-2.0]]])  # [E, H, F]
    y = epmoe.reference_moe(torch.tensor([[1.0, 0.0]]), router, gate, up, down, cfg)
    h = F.silu(torch.tensor(2.0)) * 0.5  # expert 1: silu(2) * 0.5, weight 1 after renorm
    torch.testing.assert_close(y, torch.tensor([[h, -2 * h]]))


def test_full_weights_match_a_layer_built_from_the_seed():
    cfg = epmoe.MoEConfig(hidden_size=8, intermediate_size=4, num_experts=3)
    layer = epmoe.ExpertParallelMoE(cfg, epmoe.single_process_state("cpu"), seed=11)
    router, gate, up, down = epmoe.full_weights(cfg, 11)
    assert torch.equal(layer.router_weight, router) and torch.equal(layer.w_up, up)
    assert not torch.equal(epmoe.full_weights(cfg, 12)[1], gate)


def test_compare_to_reference_catches_small_errors():
    for dtype in ("float32", "bfloat16"):
        cfg = epmoe.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, dtype=dtype)
        weights = epmoe.full_weights(cfg, 2)
        x = torch.randn(20, 16).to(cfg.dtype)
        y = epmoe.reference_moe(x, *weights, cfg)
        assert epmoe.compare_to_reference(y, x, *weights, cfg).ok
        scale = float(y.float().abs().max())
        bad = y.clone()
        bad[7, 3] += 0.05 * scale  # 5% on one element
        result = epmoe.compare_to_reference(bad, x, *weights, cfg)
        assert not result.ok and "FAIL" in str(result), (dtype, str(result))
