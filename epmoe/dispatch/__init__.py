"""Dispatch and combine: the only places where the MoE layer talks to other ranks.

Three backends, chosen by ``MoEConfig.all2all_backend``, with identical outputs:

=========================  ===========================================================
``alltoall``               counts exchanged, then exact-split all-to-alls: the minimum
                           bytes (each token once per remote rank holding its experts)
``allgather_reducescatter``  every rank gathers the group's tokens and routing, results
                           return by reduce-scatter; no per-destination counts
``low_latency``            fixed buffers of ``max_tokens_per_rank`` per rank pair: one
                           collective each way, no count exchange, no host sync
=========================  ===========================================================

With ``parallelism="tensor"`` every rank holds a slice of every expert: its own
tokens travel by the all-gather backend (every expert local), or, with the same
tokens on every rank (``tp_tokens="replicated"``), nothing travels in and one
all-reduce sums the results (``replicated.py``).
"""

from __future__ import annotations

from torch import Tensor

from ..config import MoEConfig
from ..parallel_state import ParallelState
from .allgather import AllGatherDispatcher
from .alltoall import AllToAllDispatcher
from .base import Deferred, Dispatcher, Received, Wire
from .index import pack_rows, pair_hits, plan_dispatch
from .low_latency import LowLatencyDispatcher
from .quant import Codec, make_codec
from .replicated import ReplicatedDispatcher

__all__ = [
    "AllGatherDispatcher", "AllToAllDispatcher", "Codec", "Deferred", "Dispatcher",
    "LowLatencyDispatcher", "Received", "ReplicatedDispatcher", "Wire", "make_codec",
    "make_dispatcher", "pack_rows", "pair_hits", "plan_dispatch",
]

BACKEND_CLASSES: dict[str, type[Dispatcher]] = {
    c.name: c for c in (AllToAllDispatcher, AllGatherDispatcher, LowLatencyDispatcher)
}


def make_dispatcher(config: MoEConfig, state: ParallelState, owner_E: Tensor,
                    local_index_E: Tensor) -> Dispatcher:
    """The backend ``config.all2all_backend`` for this rank (tensor parallelism: see the
    module docstring; ``owner_E`` then names this rank for every expert)."""
    if config.parallelism == "tensor":
        cls = AllGatherDispatcher if config.tp_tokens == "own" else ReplicatedDispatcher
        return cls(config, state, owner_E, local_index_E)
    return BACKEND_CLASSES[config.all2all_backend](config, state, owner_E, local_index_E)
