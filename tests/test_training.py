"""average_gradients: DDP's averaging with expert weights kept local (EP=2, and DP=2 x EP=2),
against one process that takes the mean of every rank's loss."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks
from torch import nn

import epmoe
from epmoe.training import average_gradients, clip_grad_norm_

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
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = clip_grad_norm_(model, state, float("inf"))  # the norm, nothing clipped
    clipped_norm = clip_grad_norm_(model, state, 0.5 * float(norm))
    return dict(grads=grads, local=model.moe.local_experts, norm=norm, clipped_norm=clipped_norm,
                clipped={n: p.grad.clone() for n, p in model.named_parameters()})


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

    want_norm = torch.cat([g.reshape(-1) for g in want.values()]).norm()
    for r, got in enumerate(ranks):
        # clip_grad_norm_: the whole model's norm over the ranks, each weight once
        close(got["norm"], want_norm, f"rank {r} gradient norm")
        close(got["clipped_norm"], want_norm, f"rank {r} gradient norm (second call)")
        scale = 0.5 * float(got["norm"]) / (float(got["norm"]) + 1e-6)
        for n, g in got["grads"].items():
            if n in ("moe.w_gate_up", "moe.w_down"):  # this rank's experts only
                close(g, want[n][list(got["local"])], f"rank {r} {n}")
                close(got["clipped"][n], scale * want[n][list(got["local"])], f"clipped {n}")
            else:  # replicated: the same averaged gradient on every rank
                close(g, want[n], f"rank {r} {n}")
                close(got["clipped"][n], scale * want[n], f"rank {r} clipped {n}")
