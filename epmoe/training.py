"""Training with expert parallelism: DDP's gradient averaging, aware of which weights are local.

After ``loss.backward()`` on every rank (each on its own tokens, ``loss`` this rank's
mean, as under DDP), :func:`average_gradients` makes every gradient that of the mean
of all ranks' losses:

- a replicated weight (router, shared expert, everything outside the MoE layers)
  holds on each rank its own tokens' part: summed over the world, divided by the
  world size (DDP's all-reduce mean);
- a routed expert's weight is held by one rank of each EP group, and its gradient
  already has every rank's tokens of that group (they travelled to it, and their
  gradients back): summed over the DP group (the ranks holding the same experts),
  divided by the world size. Never all-reduced across the EP group.

One all-reduce per group and dtype (the gradients flattened into one buffer). Every
rank calls it together; a parameter without a gradient counts as zeros. Shape-free:
it only reads ``ExpertParallelMoE.expert_tensors()`` to tell the two kinds apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .health import guarded
from .moe import ExpertParallelMoE
from .parallel_state import ParallelState

__all__ = ["average_gradients", "expert_parameters"]


def expert_parameters(model: nn.Module) -> list[Tensor]:
    """The routed experts' stacked weights of every MoE layer in ``model`` (local to the
    rank, or to its DP group)."""
    out = []
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE) and m.config.tp_tokens != "replicated":
            out += m.expert_tensors()
    return out


@torch.no_grad()
def average_gradients(model: nn.Module, state: ParallelState) -> None:
    """Average ``model``'s gradients as DDP would, expert weights over the DP group only
    (see the module docstring). With ``tp_tokens="replicated"`` layers, which see the
    same tokens on every rank, use plain DDP instead."""
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE) and m.tensor_parallel and \
                m.config.tp_tokens == "replicated":
            raise ValueError("average_gradients: tp_tokens='replicated' layers see the same "
                             "tokens on every rank; their gradients are not per-rank parts")
    if state.world_size == 1:
        return
    local = {id(t) for t in expert_parameters(model)}
    buckets: dict[tuple[bool, torch.dtype], list[Tensor]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # (unused on this rank: its peers may have one)
            p.grad = torch.zeros_like(p)
        buckets.setdefault((id(p) in local, p.grad.dtype), []).append(p.grad)
    for (is_expert, _dtype), grads in sorted(buckets.items(), key=lambda kv: (kv[0][0],
                                                                               str(kv[0][1]))):
        group = state.dp_group if is_expert else None
        if is_expert and state.dp_size == 1:
            flat = None  # nothing to add over a DP group of one
        else:
            flat = torch.cat([g.reshape(-1) for g in grads])
            ranks = state.dp_ranks if is_expert else tuple(range(state.world_size))
            with guarded(state.heartbeat, "the gradient averaging", ranks):
                dist.all_reduce(flat, group=group)
        start = 0
        for g in grads:
            n = g.numel()
            if flat is not None:
                g.copy_(flat[start : start + n].view_as(g))
            g.div_(state.world_size)
            start += n
