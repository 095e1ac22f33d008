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

__all__ = [
    "AllGatherDispatcher", "AllToAllDispatcher", "Codec", "Deferred", "Dispatcher",
    "LowLatencyDispatcher", "Received", "Wire", "make_codec", "make_dispatcher", "pack_rows",
    "pair_hits", "plan_dispatch",
]

BACKEND_CLASSES: dict[str, type[Dispatcher]] = {
    c.name: c for c in (AllToAllDispatcher, AllGatherDispatcher, LowLatencyDispatcher)
}


def make_dispatcher(config: MoEConfig, state: ParallelState, owner_E: Tensor,
                    local_index_E: Tensor) -> Dispatcher:
    """The backend ``config.all2all_backend`` for this rank."""
    return BACKEND_CLASSES[config.all2all_backend](config, state, owner_E, local_index_E)
