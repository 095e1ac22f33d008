"""Balancing for training: the Switch loss and the z-loss over the whole EP group, and
DeepSeek-V3's bias balancing; by hand, then on 2 and 3 gloo ranks against one process."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

import epmoe
from epmoe.balance import bias_step, router_probs, switch_aux_share, z_loss_share

H = 16


def test_switch_loss_by_hand():
    # uniform: 1.0; everything on one expert with all its probability: E
    probs = torch.full((8, 4), 0.25)
    counts = torch.tensor([4, 4, 4, 4])  # 8 tokens x top-2
    assert float(switch_aux_share(probs.sum(0), counts, 8, 2)) == pytest.approx(1.0)
    hot = torch.zeros(8, 4)
    hot[:, 0] = 1.0
    assert float(switch_aux_share(hot.sum(0), torch.tensor([8, 0, 0, 0]), 8, 1)) == 4.0
    # two ranks' shares add up to the loss of all tokens
    a, b = probs[:3].sum(0), probs[3:].sum(0)
    total = switch_aux_share(a, counts, 8, 2) + switch_aux_share(b, counts, 8, 2)
    assert float(total) == pytest.approx(1.0)


def test_z_loss_and_probs_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    lse = torch.logsumexp(logits, -1)
    assert float(z_loss_share(logits, 2)) == pytest.approx(float(lse.square().mean()))
    p = router_probs(torch.tensor([[0.0, 2.0]]), "sigmoid")
    assert float(p.sum()) == pytest.approx(1.0) and p[0, 1] > p[0, 0]


def test_bias_step_and_config_checks():
    b = bias_step(torch.zeros(4), torch.tensor([10, 0, 5, 5]), 0.01)
    assert b.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    with pytest.raises(ValueError, match="bias_update_rate > 0 needs score_correction_bias"):
        epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, bias_update_rate=0.1)
    with pytest.raises(ValueError, match="aux_loss_coef must be a number >= 0"):
        epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, aux_loss_coef=-1.0)


def group_losses(x, router, cfg):
    """The losses of all the group's tokens on one process, straight from the definitions."""
    _, ids, logits = epmoe.route(x, router, cfg, return_logits=True)
    E, T = cfg.num_experts, x.shape[0]
    f = torch.bincount(ids.flatten(), minlength=E).float() / (T * cfg.top_k)
    P = router_probs(logits, cfg.scoring).mean(0)
    z = torch.logsumexp(logits.float(), -1).square().mean()
    return cfg.aux_loss_coef * E * (f * P).sum() + cfg.z_loss_coef * z


CFG = dict(hidden_size=H, intermediate_size=24, num_experts=6, top_k=2, aux_loss_coef=0.01,
           z_loss_coef=0.001)
COUNTS = [7, 0, 12]


def _loss_worker(scoring: str) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    cfg = epmoe.MoEConfig(**CFG, scoring=scoring, max_chunk_tokens=5)
    x_all = torch.randn(sum(COUNTS[: state.ep_size]), H, generator=torch.Generator().manual_seed(3))
    start = sum(COUNTS[: state.rank])
    x = x_all[start : start + COUNTS[state.rank]].clone().requires_grad_(True)
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=4)
    layer(x)
    layer.aux_loss.backward()
    return dict(loss=layer.aux_loss.detach(), router_grad=layer.router_weight.grad,
                x_grad=x.grad)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_losses_over_the_group_equal_one_process(world, scoring):
    ranks = run_ranks(_loss_worker, world, scoring)
    cfg = epmoe.MoEConfig(**CFG, scoring=scoring)
    x = torch.randn(sum(COUNTS[:world]), H, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    router = epmoe.full_weights(cfg, seed=4)[0].clone().requires_grad_(True)
    want = group_losses(x, router, cfg)
    want.backward()
    assert float(sum(r["loss"] for r in ranks)) == pytest.approx(float(want.detach()), rel=1e-6)
    got_grad = sum(r["router_grad"] for r in ranks)
    assert torch.allclose(got_grad, router.grad, rtol=1e-5, atol=1e-8)
    got_x = torch.cat([r["x_grad"] for r in ranks])
    assert torch.allclose(got_x, x.grad, rtol=1e-5, atol=1e-8)


def _bias_worker(rate: float) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=24, num_experts=8, top_k=2,
                          scoring="sigmoid", score_correction_bias=True,
                          bias_update_rate=rate or 1.0)
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=1)
    with torch.no_grad():
        layer.score_correction_bias.zero_()
        layer.router_weight[0] += 0.5  # expert 0 hot
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(state.rank)).abs()
    balance = []
    for _ in range(40):
        with torch.no_grad():
            layer(x)
        counts = layer.update_bias() if rate else \
            epmoe.collectives.all_reduce_sum(layer._bias_counts_E, state.ep_group)
        layer._bias_counts_E.zero_()
        balance.append(float(counts.double().mean() / counts.max()))
    return dict(balance=balance, bias=layer.score_correction_bias.clone())


def test_bias_balancing_evens_the_load():
    on = run_ranks(_bias_worker, 2, 0.01)
    off = run_ranks(_bias_worker, 2, 0.0)
    assert torch.equal(on[0]["bias"], on[1]["bias"])  # the same update on every rank
    assert off[0]["balance"][-1] == off[0]["balance"][0]  # nothing changes without it
    assert on[0]["balance"][-1] > off[0]["balance"][-1] + 0.2
    assert on[0]["bias"][0] < 0  # the hot expert's bias went down
