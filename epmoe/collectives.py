"""The collectives of expert parallelism: variable-size, differentiable, bounded by the
group's timeout.

Each is the identity on a group of one (or with no process group at all). The
backward of a variable-split all-to-all is the all-to-all with the splits
swapped; every rank joins the same collectives in backward too (see
:func:`_joins_backward`). Only the dispatch backends, the layer's agreements
(config check, load statistics), the moves of a rebalance (``epmoe.rebalance``), the
EP-vs-TP measurement and the CLIs call these.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .shm import shm_for

__all__ = [
    "PendingAllToAll",
    "all_gather_known",
    "all_gather_v",
    "all_reduce_sum",
    "all_to_all_v",
    "all_to_all_v_start",
    "copy_to_group",
    "exchange_counts",
    "gather_ints",
    "gather_objects",
    "gather_sizes",
    "reduce_scatter_v",
    "sum_over_group",
]


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_to_all(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class PendingAllToAll:
    """An all-to-all in flight: ``wait()`` blocks until it lands and returns the result.

    Local work placed between :func:`all_to_all_v_start` and ``wait()`` (the
    shared expert, say) overlaps the transfer where the backend runs
    collectives asynchronously (gloo's worker threads, NCCL's stream).
    """

    def __init__(self, x: Tensor, out: Tensor, work, send: list[int], recv: list[int],
                 group) -> None:
        self.x, self.out, self.work = x, out, work
        self.send, self.recv, self.group = send, recv, group

    def wait(self) -> Tensor:
        if self.work is None:  # a group of one: nothing travelled
            return self.out
        self.work.wait()
        return _AllToAllDone.apply(self.x, self)


class _AllToAllDone(torch.autograd.Function):
    """Ties a finished all-to-all into autograd: backward is the all-to-all with the
    splits swapped (what each rank received goes back to where it came from)."""

    @staticmethod
    def forward(ctx, x: Tensor, pending: PendingAllToAll) -> Tensor:
        ctx.send, ctx.recv, ctx.group = pending.send, pending.recv, pending.group
        return pending.out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None


def all_to_all_v_start(
    x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None
) -> PendingAllToAll:
    """Start :func:`all_to_all_v` without waiting for it; see :class:`PendingAllToAll`."""
    G = _group_size(group)
    if len(send_splits) != G or len(recv_splits) != G:
        raise ValueError(f"all_to_all_v needs one split per group rank ({G}), got "
                         f"send={len(send_splits)} recv={len(recv_splits)}")
    if x.shape[0] != sum(send_splits):
        raise ValueError(f"all_to_all_v: x has {x.shape[0]} rows, send_splits sum to "
                         f"{sum(send_splits)}")
    if G == 1:
        return PendingAllToAll(x, x, None, send_splits, recv_splits, group)
    shm = shm_for(group)  # inference on one host's CPU ranks (epmoe.shm): done at once
    if shm is not None:
        out = shm.all_to_all(x, send_splits, recv_splits)
        if out is not None:
            return PendingAllToAll(x, out, None, send_splits, recv_splits, group)
    x = _joins_backward(x)
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.detach().contiguous(), list(recv_splits),
                                  list(send_splits), group=group, async_op=True)
    return PendingAllToAll(x, out, work, list(send_splits), list(recv_splits), group)


def all_to_all_v(
    x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None
) -> Tensor:
    """Send ``x[rows of block j]`` to group rank j; return the blocks received, by source rank.

    ``x`` is ``[sum(send_splits), ...]``; the result is ``[sum(recv_splits), ...]``.
    Differentiable. ``recv_splits`` must be what the peers send (see
    :func:`exchange_counts`).
    """
    return all_to_all_v_start(x, send_splits, recv_splits, group).wait()


def _joins_backward(x: Tensor) -> Tensor:
    """Make sure this rank runs the collective's backward whenever its peers might.

    Whether a collective runs in backward depends on each rank's own graph: a
    rank whose input needs no gradient (no tokens, a frozen router) would skip
    the backward all-to-all that its peers wait in. Under grad mode every
    floating-point input therefore enters as a leaf that requires grad, and
    every rank runs the same collectives in the same order. ``loss.backward()``
    reaches these leaves; ``torch.autograd.grad(loss, inputs)`` must name the
    same inputs on every rank.
    """
    if torch.is_grad_enabled() and x.is_floating_point() and not x.requires_grad:
        return x.detach().requires_grad_(True)
    return x


def exchange_counts(send_counts: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``send_counts[j]`` rows go to rank j; returns ``recv_counts[j]``, rows coming from j.

    Shapes ``[G]`` or ``[G, n]`` (several counts per pair). Not differentiable.
    """
    G = _group_size(group)
    if G == 1:
        return send_counts.clone()
    shm = shm_for(group)
    if shm is not None:
        out = shm.all_to_all(send_counts, [1] * G, [1] * G)
        if out is not None:
            return out
    out = torch.empty_like(send_counts)
    dist.all_to_all_single(out, send_counts.contiguous(), group=group)
    return out


class _AllGatherV(torch.autograd.Function):
    """All-gather of uneven first dims; backward sends each rank the gradient of its rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        rank, longest = dist.get_rank(group), max(sizes)
        # Pad to the longest: all_gather needs equal shapes (costs one copy of x).
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: sizes[rank]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, rank = ctx.sizes, dist.get_rank(ctx.group)
        mine = sizes[rank]
        # Rank j gets grad[rows of j] from every rank and sums them: a reduce-scatter,
        # written as an all-to-all because gloo has no uneven reduce-scatter.
        got = _all_to_all(grad.contiguous(), sizes, [mine] * len(sizes), ctx.group)
        return got.view(len(sizes), mine, *grad.shape[1:]).sum(0), None, None


class _ReduceScatterV(torch.autograd.Function):
    """Sum over ranks of each rank's rows: rank j keeps the rows of block j."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        mine = sizes[dist.get_rank(group)]
        # An all-to-all of the blocks, then a fixed-order sum in fp32 (or float64 for
        # float64 rows): gloo has no uneven reduce-scatter, and this one is deterministic.
        got = _all_to_all(x.contiguous(), sizes, [mine] * len(sizes), group)
        acc = torch.promote_types(x.dtype, torch.float32)
        return got.view(len(sizes), mine, *x.shape[1:]).to(acc).sum(0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllGatherV.apply(grad.contiguous(), ctx.sizes, ctx.group), None, None


def reduce_scatter_v(x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """``x [sum(sizes), ...]`` on every rank; rank j gets the sum over ranks of rows
    ``sizes[:j].sum() .. + sizes[j]``. Differentiable (backward: :func:`all_gather_v`)."""
    if _group_size(group) == 1:
        return x
    return _ReduceScatterV.apply(_joins_backward(x), list(sizes), group)


def gather_ints(values: list[int], device: torch.device,
                group: dist.ProcessGroup | None) -> list[list[int]]:
    """Every group rank's list of ints (same length everywhere), by rank.
    NOTE: a collective and a host sync."""
    if _group_size(group) == 1:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.int64, device=device)
    got = [torch.empty_like(t) for _ in range(_group_size(group))]
    dist.all_gather(got, t, group=group)
    return torch.stack(got).tolist()


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The sum over the group's ranks of ``t`` (a new tensor; ``t`` itself on a group of
    one). Not differentiable."""
    if _group_size(group) == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, group=group)
    return out


def gather_objects(obj, group: dist.ProcessGroup | None) -> list:
    """Every group rank's picklable ``obj``, by rank; ``[obj]`` without a process group.
    For the world, pass ``dist.group.WORLD`` (``None`` too before any process group)."""
    if group is None or _group_size(group) == 1:
        return [obj]
    out = [None] * _group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    """Every group rank's ``n``, by rank. NOTE: a collective and a host sync."""
    return [v[0] for v in gather_ints([n], device, group)]


def all_gather_known(x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """:func:`all_gather_v` when every rank's row count is already known."""
    if _group_size(group) == 1:
        return x
    return _AllGatherV.apply(_joins_backward(x), list(sizes), group)


def all_gather_v(x: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, list[int]]:
    """Concatenate every group rank's ``x`` (first dims may differ) in rank order.

    Returns ``(gathered [sum(sizes), ...], sizes)``. Differentiable. Costs one
    extra all-gather of the sizes and a host sync to read them.
    """
    sizes = gather_sizes(x.shape[0], x.device, group)  # NOTE: host sync (sizes the buffers)
    return all_gather_known(x, sizes, group), sizes


class _SumOverGroup(torch.autograd.Function):
    """Forward: the sum over the group (one all-reduce); backward: the identity, since
    every rank holds the same downstream computation and so the same gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # (bf16 sums in fp32)
        wide = wide.clone() if wide is x else wide
        dist.all_reduce(wide, group=group)
        return wide.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Forward: the identity; backward: the sum over the group of the gradients (each
    rank's part of the input's use)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _SumOverGroup.apply(grad.contiguous(), ctx.group), None


def sum_over_group(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Megatron's "g": the all-reduced sum of every rank's partial ``x`` (tensor
    parallelism with the same tokens on every rank); backward is the identity."""
    if _group_size(group) == 1:
        return x
    return _SumOverGroup.apply(x, group)


def copy_to_group(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Megatron's "f": ``x`` as it is, whose gradient is summed over the group in backward."""
    if _group_size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)
