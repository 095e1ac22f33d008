"""Process groups for expert parallelism (the collectives the MoE layer uses live in
``epmoe.collectives`` and are re-exported here).

The world is split as DP x EP. Expert-parallel (EP) groups are blocks of
consecutive ranks: the ranks of one EP group together hold all the experts, and
tokens travel between them by all-to-all. Data-parallel (DP) groups join the
ranks that sit at the same position in each EP group: they hold the same
experts (their gradients would be averaged there when training).

Worked example, 8 ranks g0 ... g7 with ``ep_size=4`` (so ``dp_size=2``)::

    EP groups (consecutive ranks):   [g0 g1 g2 g3]   [g4 g5 g6 g7]
    DP groups (same EP position):    [g0 g4]  [g1 g5]  [g2 g6]  [g3 g7]

    rank 6: ep_rank = 6 % 4 = 2 (third in its EP group [g4 g5 g6 g7])
            dp_rank = 6 // 4 = 1 (second in its DP group [g2 g6])

With 8 experts and linear placement, g0 and g4 hold experts 0-1, g1 and g5 hold
2-3, and so on.

Nothing here is global: :func:`init_distributed` builds one frozen
:class:`ParallelState` and callers pass it to the modules that need it. Every
collective runs on a group created with the state's timeout, so a rank that
never arrives makes the others fail after ``timeout_s`` instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collectives import (  # re-exported: the seed's parallel_state holds them
    PendingAllToAll,
    all_gather_known,
    all_gather_v,
    all_reduce_sum,
    all_to_all_v,
    all_to_all_v_start,
    exchange_counts,
    gather_ints,
    gather_objects,
    gather_sizes,
    reduce_scatter_v,
)
from .health import Heartbeat, guarded, stop_heartbeats

__all__ = [
    "PendingAllToAll",
    "all_gather_known",
    "all_gather_v",
    "all_reduce_sum",
    "all_to_all_v",
    "all_to_all_v_start",
    "exchange_counts",
    "gather_ints",
    "gather_objects",
    "gather_sizes",
    "reduce_scatter_v",
    "ParallelState",
    "destroy_distributed",
    "group_layout",
    "init_distributed",
    "single_process_state",
    "world_barrier",
]

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True, eq=False)
class ParallelState:
    """Who this process is and which groups it belongs to.

    ``ep_group`` / ``dp_group`` are ``None`` when no process group exists (a
    plain ``python`` run); the collectives below then act as the identity.
    """

    rank: int  # global rank in the world
    world_size: int  # number of processes in the world
    local_rank: int  # rank on this host (selects the GPU)
    ep_rank: int  # position in the EP group (0 .. ep_size-1)
    ep_size: int  # ranks that share out the experts
    ep_group: dist.ProcessGroup | None
    ep_ranks: tuple[int, ...]  # global ranks of this rank's EP group, by ep_rank
    dp_rank: int  # position in the DP group (0 .. dp_size-1)
    dp_size: int  # world_size // ep_size
    dp_group: dist.ProcessGroup | None
    dp_ranks: tuple[int, ...]  # global ranks of this rank's DP group, by dp_rank
    device: torch.device  # where this rank's tensors live
    backend: str | None  # "nccl", "gloo", or None without a process group
    timeout_s: float  # bound on every collective
    # Names the failed rank when a collective fails (epmoe.health); None: no process group.
    heartbeat: Heartbeat | None = None

    def __repr__(self) -> str:
        return (
            f"ParallelState(rank={self.rank}/{self.world_size}, ep={self.ep_rank}/{self.ep_size}, "
            f"dp={self.dp_rank}/{self.dp_size}, device={self.device}, backend={self.backend})"
        )


def group_layout(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The EP groups and DP groups of a world, as lists of global ranks.

    >>> group_layout(8, 4)
    ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if ep_size < 1 or world_size % ep_size != 0:
        allowed = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"ep_size={ep_size} must divide the world size {world_size}; allowed: {allowed}"
        )
    dp_size = world_size // ep_size
    ep_groups = [list(range(d * ep_size, (d + 1) * ep_size)) for d in range(dp_size)]
    dp_groups = [list(range(e, world_size, ep_size)) for e in range(ep_size)]
    return ep_groups, dp_groups


def _pick_device(force_cpu: bool, local_rank: int) -> torch.device:
    if not force_cpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def single_process_state(
    device: torch.device | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ParallelState:
    """EP=1 without any process group: every expert is local, no collective runs."""
    dev = torch.device(device) if device is not None else _pick_device(False, 0)
    return ParallelState(
        rank=0, world_size=1, local_rank=0,
        ep_rank=0, ep_size=1, ep_group=None, ep_ranks=(0,),
        dp_rank=0, dp_size=1, dp_group=None, dp_ranks=(0,),
        device=dev, backend=None, timeout_s=timeout_s,
    )


def init_distributed(
    backend: str | None = None,
    force_cpu: bool = False,
    ep_size: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelState:
    """Start (or join) the process group that torchrun describes and build the EP/DP groups.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun sets them. Without them (a
    plain ``python`` run) it returns :func:`single_process_state` and creates no
    process group.

    Backend: ``"nccl"`` when CUDA is available with at least as many GPUs as
    local ranks and ``force_cpu`` is false, ``"gloo"`` otherwise. Each rank's
    device is ``cuda:LOCAL_RANK`` under NCCL, the CPU under gloo.

    ``ep_size`` defaults to the world size and must divide it. All ranks check
    at start that they agree on the world size and ``ep_size``.
    """
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be None (choose), 'nccl' or 'gloo'; got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    if ep_size is not None and (not isinstance(ep_size, int) or ep_size < 1):
        raise ValueError(f"ep_size must be a positive int or None (world size), got {ep_size!r}")

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if ep_size not in (None, 1):
            raise ValueError(
                f"ep_size={ep_size} needs {ep_size} processes, but this is a single process "
                "(no RANK/WORLD_SIZE in the environment); start it with "
                f"torchrun --nproc_per_node={ep_size} ..."
            )
        if backend == "nccl" and (force_cpu or not torch.cuda.is_available()):
            raise ValueError("backend='nccl' needs CUDA" + (" and force_cpu=False" if force_cpu
                             else ", which is not available here") + "; use 'gloo' or None")
        return single_process_state(_pick_device(force_cpu or backend == "gloo", 0), timeout_s)

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    ep = world_size if ep_size is None else ep_size
    group_layout(world_size, ep)  # validates ep before any collective

    enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size
    if dist.is_initialized():  # the caller started the world: take its backend as it is
        backend = backend or dist.get_backend()
        if backend != dist.get_backend():
            raise ValueError(f"backend={backend!r}, but the process group already runs "
                             f"{dist.get_backend()!r}")
    if backend is None:
        backend = "nccl" if enough_gpus and not force_cpu else "gloo"
    elif backend == "nccl" and (force_cpu or not enough_gpus):
        raise ValueError(
            f"backend='nccl' needs one GPU per local rank ({local_world_size}), found "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
            + (" and force_cpu=True" if force_cpu else "")
            + "; use backend='gloo' or None"
        )
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    _check_agreement(rank, world_size, ep, device)
    heartbeat = Heartbeat.for_world(rank, world_size, timeout_s)

    ep_groups, dp_groups = group_layout(world_size, ep)
    # new_group is collective over the world: every rank creates every group, in order.
    ep_group = dp_group = None
    ep_ranks = dp_ranks = ()
    for ranks in ep_groups:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            ep_group, ep_ranks = g, tuple(ranks)
    for ranks in dp_groups:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            dp_group, dp_ranks = g, tuple(ranks)
    return ParallelState(
        rank=rank, world_size=world_size, local_rank=local_rank,
        ep_rank=rank % ep, ep_size=ep, ep_group=ep_group, ep_ranks=ep_ranks,
        dp_rank=rank // ep, dp_size=world_size // ep, dp_group=dp_group, dp_ranks=dp_ranks,
        device=device, backend=backend, timeout_s=timeout_s, heartbeat=heartbeat,
    )


def _check_agreement(rank: int, world_size: int, ep_size: int, device: torch.device) -> None:
    """All ranks compare (world size, ep_size); any difference fails on every rank."""
    mine = torch.tensor([world_size, ep_size], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    seen = [tuple(t.tolist()) for t in everyone]
    if len(set(seen)) != 1:
        table = ", ".join(f"rank {r}: world_size={w} ep_size={e}" for r, (w, e) in enumerate(seen))
        raise RuntimeError(
            f"ranks disagree on the parallel layout (this is rank {rank}): {table}. "
            "Every rank must be started with the same world size and ep_size."
        )


def world_barrier(state: ParallelState, what: str) -> None:
    """Every rank of the world waits here (nothing with one process); a rank that fails
    or stalls meanwhile is named (``health.guarded``), ``what`` says where."""
    if state.world_size > 1:
        with guarded(state.heartbeat, what, tuple(range(state.world_size))):
            dist.barrier()


def destroy_distributed(state: ParallelState | None = None) -> None:
    """End the process group, if one was started, and the heartbeat (``state``'s, or
    without ``state`` every one of this process); safe to call more than once."""
    from .shm import detach

    detach()  # (shared-memory all-to-alls of the groups about to go)
    if state is not None and state.heartbeat is not None:
        state.heartbeat.stop()
    else:
        stop_heartbeats()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
