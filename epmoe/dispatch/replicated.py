"""Tensor parallelism with the same tokens on every rank: nothing travels in, one all-reduce out.

``MoEConfig(parallelism="tensor", tp_tokens="replicated")``: every rank of the
group passes the same tokens and holds a slice of every expert's F, so every
rank computes every (token, expert) pair on its slice and the partial outputs are
summed by one all-reduce (Megatron's and vLLM's MoE without EP). Before it, a
header of ``[tokens, problem, detail, more]`` per rank is gathered: a bad input on
one rank, or ranks that pass different numbers of tokens, raise on every rank
instead of pairing up wrong all-reduces. Shape legend: T tokens (the same on every
rank), k top_k, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..collectives import copy_to_group, gather_ints, sum_over_group
from ..errors import InputError
from .base import Deferred, Dispatcher, Received, Wire, header_of, settle

__all__ = ["ReplicatedDispatcher"]


@dataclass(frozen=True, eq=False)
class ReplicatedHandle:
    tokens: int  # T, the same on every rank
    out_bytes: int  # bytes of one partial-output row


class ReplicatedDispatcher(Dispatcher):
    name = "replicated"

    def start(self, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor,
              error: InputError | None = None, more: bool = False) -> Deferred:
        got = gather_ints([x_TH.shape[0], *header_of(error, more)], x_TH.device, self.group)
        more = settle([g[1:] for g in got], error, self.state.ep_ranks, self.where)
        sizes = [g[0] for g in got]
        if len(set(sizes)) > 1:
            raise ValueError(f"{self.where}: tp_tokens='replicated' needs the same tokens on "
                             f"every rank of the group, got {sizes} tokens on ranks "
                             f"{list(self.state.ep_ranks)} (tp_tokens='own' takes each "
                             "rank's own)")
        # Every slot's expert is here (a slice of it): local id = expert id. The tokens and
        # weights feed each rank's slice, so their gradients add up over the group.
        x_in = copy_to_group(x_TH, self.group)
        w_in = copy_to_group(weights_TK.float(), self.group)
        handle = ReplicatedHandle(x_TH.shape[0], self.partial_bytes(x_TH.shape[1]))
        return Deferred(lambda: (Received(x_in, ids_TK, w_in), handle), more)

    def combine_start(self, partial_TH: Tensor, handle: ReplicatedHandle) -> Deferred:
        return Deferred(lambda: sum_over_group(partial_TH, self.group))

    def wire(self, handle: ReplicatedHandle) -> Wire:
        # A ring all-reduce sends 2 (G - 1) / G of the buffer per rank: 2 / G to each peer.
        G, me = self.G, self.me
        share = 2 * handle.tokens * handle.out_bytes // G if G > 1 else 0
        to_peer = [0 if g == me else share for g in range(G)]
        return Wire([0] * G, [0] * G, [0] * G, to_peer)
