"""average_gradients: DDP's averaging with expert weights kept local (EP=2, and DP=2 x EP=2),
against one process that takes the mean of every rank's loss."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks
from torch import nn

import epmoe
from epmoe.training import average_gradients

H = 16
CFG = dict(hidden_size=H, intermediate_size=24, num_experts=4, top_k=2,
           shared_intermediate_size=8)
COUNTS = [5, 9, 0, 7]


class Tiny(nn.Module):
    """A replicated linear layer, then the MoE layer (EP, or the reference)."""

    def __init__(self, moe: nn.Module | None) -> None:
        super().__init__()
        self.pre = nn.Linear(H, H)
        with torch.no_grad():
            g = torch.Generator().manual_seed(9)
            self.pre.weight.copy_(torch.randn(H, H, generator=g) / 4)
            self.pre.bias.copy_(torch.randn(H, generator=g) / 4)
        self.moe = moe


def tokens(world: int):
    x = torch.randn(sum(COUNTS[:world]), H, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    return x, probe


def _worker(ep_size: int) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60, ep_size=ep_size)
    cfg = epmoe.MoEConfig(**CFG)
    model = Tiny(epmoe.ExpertParallelMoE(cfg, state, seed=5))
    x_all, probe_all = tokens(state.world_size)
    start = sum(COUNTS[: state.rank])
    x = x_all[start : start + COUNTS[state.rank]]
    probe = probe_all[start : start + COUNTS[state.rank]]
    y = model.moe(model.pre(x))
    loss = (y * probe).sum() / max(x.shape[0], 1)  # this rank's mean, as under DDP
    loss.backward()
    average_gradients(model, state)
    return dict(grads={n: p.grad.clone() for n, p in model.named_parameters()},
                local=model.moe.local_experts)


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2), (3, 3)])
def test_average_gradients_equals_the_mean_loss(world, ep_size):
    ranks = run_ranks(_worker, world, ep_size)
    cfg = epmoe.MoEConfig(**CFG)
    weights = {**dict(zip(("router_weight", "w_gate", "w_up", "w_down"),
                          epmoe.full_weights(cfg, seed=5), strict=True)),
               **epmoe.full_optional_weights(cfg, seed=5)}
    leaves = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    ref = Tiny(None)
    x_all, probe_all = tokens(world)
    losses = []
    for r, (x, probe) in enumerate(zip(x_all.split(COUNTS[:world]),
                                       probe_all.split(COUNTS[:world]), strict=True)):
        y = epmoe.reference_moe(ref.pre(x), **leaves, config=cfg)
        losses.append((y * probe).sum() / max(COUNTS[r], 1))
    (sum(losses) / world).backward()  # DDP: the mean of the ranks' losses
    want = {"pre.weight": ref.pre.weight.grad, "pre.bias": ref.pre.bias.grad,
            **{f"moe.{n}": w.grad for n, w in leaves.items()}}
    want["moe.w_gate_up"] = torch.cat([want.pop("moe.w_gate"), want.pop("moe.w_up")], dim=1)

    def close(got, exp, what):
        assert torch.allclose(got, exp, rtol=1e-5, atol=1e-7), \
            f"{what}: max error {(got - exp).abs().max():.3g}"

    for r, got in enumerate(ranks):
        for n, g in got["grads"].items():
            if n in ("moe.w_gate_up", "moe.w_down"):  # this rank's experts only
                close(g, want[n][list(got["local"])], f"rank {r} {n}")
            else:  # replicated: the same averaged gradient on every rank
                close(g, want[n], f"rank {r} {n}")
