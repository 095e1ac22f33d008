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

:func:`clip_grad_norm_` is ``torch.nn.utils.clip_grad_norm_`` for the whole model
over the ranks: each weight counted once (a replicated one on one rank, an expert on
the rank of its EP group that holds it). :func:`save_optimizer` and
:func:`load_optimizer` write and read an optimiser's state per rank (safetensors):
every rank of DP replica 0 its experts' state, rank 0 also the replicated weights'.

Training with redundant experts (``num_redundant_experts > 0``) is not supported: the
copies of an expert would get different gradients and drift apart.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .health import guarded
from .moe import ExpertParallelMoE
from .parallel_state import ParallelState

__all__ = ["average_gradients", "clip_grad_norm_", "expert_parameters", "load_optimizer",
           "save_optimizer"]


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


def _check_trainable(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE) and m.config.num_redundant_experts:
            raise ValueError(f"{m.name}: training with num_redundant_experts="
                             f"{m.config.num_redundant_experts} is not supported (the copies of an "
                             "expert would drift apart); use 0")


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, state: ParallelState, max_norm: float) -> Tensor:
    """Scale every gradient so that the model's global L2 norm is at most ``max_norm``
    (after :func:`average_gradients`); returns the norm before clipping, the same on
    every rank. Replicated weights (equal on every rank) count once; each rank adds its
    experts' squares, summed over its EP group (one all-reduce of one number)."""
    _check_trainable(model)
    local = {id(t) for t in expert_parameters(model)}
    grads = [(id(p) in local, p.grad) for p in model.parameters() if p.grad is not None]
    dev = grads[0][1].device if grads else state.device
    sq_expert = torch.zeros((), dtype=torch.float64, device=dev)
    sq_dense = torch.zeros((), dtype=torch.float64, device=dev)
    for is_expert, g in grads:
        sq = g.double().pow(2).sum()
        if is_expert:
            sq_expert += sq
        else:
            sq_dense += sq
    if state.ep_size > 1:
        with guarded(state.heartbeat, "the gradient norm", state.ep_ranks):
            dist.all_reduce(sq_expert, group=state.ep_group)
    norm = (sq_expert + sq_dense).sqrt()
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1.0:
        for _, g in grads:
            g.mul_(scale)
    return norm.float()


def _optimizer_files(state: ParallelState) -> tuple[str, str]:
    return ("optimizer-dense.safetensors",
            f"optimizer-experts-{state.ep_rank + 1:05d}-of-{state.ep_size:05d}.safetensors")


def _named_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError("save_optimizer: the optimiser holds a tensor that is not a "
                                 "parameter of the model")
            out[by_id[id(p)]] = optimizer.state.get(p, {})
    return out


def save_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, out_dir: str | Path,
                   state: ParallelState) -> None:
    """Write ``optimizer``'s per-parameter state (tensors only, e.g. AdamW's ``step``,
    ``exp_avg``, ``exp_avg_sq``) under ``out_dir``: ``optimizer-dense.safetensors`` from
    rank 0 (replicated weights), ``optimizer-experts-000rr-of-000GG.safetensors`` from
    each rank of DP replica 0 (its experts' rows). The hyperparameters are not saved:
    the caller rebuilds the optimiser with them. Local files only; no collective."""
    from safetensors.torch import save_file

    _check_trainable(model)
    local = {id(t) for t in expert_parameters(model)}
    params = dict(model.named_parameters())
    dense, experts = {}, {}
    for name, st in _named_state(optimizer, model).items():
        into = experts if id(params[name]) in local else dense
        for key, value in st.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"save_optimizer: state {key!r} of {name} is a "
                                 f"{type(value).__name__}, not a tensor")
            into[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    dense_file, expert_file = _optimizer_files(state)
    out = Path(out_dir)
    if state.rank == 0:
        save_file(dense, out / dense_file)
    if state.dp_rank == 0:
        save_file(experts, out / expert_file)


def load_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, in_dir: str | Path,
                   state: ParallelState) -> None:
    """Read back what :func:`save_optimizer` wrote (with the same EP size and placement):
    every rank the replicated weights' state from rank 0's file and its experts' from its
    EP rank's file. Shapes are checked; a missing file or tensor raises ``ValueError``."""
    from safetensors.torch import load_file

    local = {id(t) for t in expert_parameters(model)}
    params = dict(model.named_parameters())
    files = {}
    for kind, file in zip(("dense", "experts"), _optimizer_files(state), strict=True):
        path = Path(in_dir) / file
        if not path.is_file():
            raise ValueError(f"load_optimizer: {path} does not exist (saved with another EP "
                             f"size? this run has ep_size={state.ep_size})")
        files[kind] = load_file(path, device=str(state.device))
    by_name: dict[str, dict[str, dict[str, Tensor]]] = {"dense": {}, "experts": {}}
    for kind, saved in files.items():
        for k, value in saved.items():
            name, _, key = k.rpartition(".")
            by_name[kind].setdefault(name, {})[key] = value
    for name in _named_state(optimizer, model):
        p = params[name]
        st = by_name["experts" if id(p) in local else "dense"].get(name)
        if st is None:
            raise ValueError(f"load_optimizer: no saved state for {name} in {in_dir}")
        for k, value in st.items():
            if value.dim() and value.shape != p.shape:
                raise ValueError(f"load_optimizer: {name}.{k} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
        optimizer.state[p] = dict(st)
