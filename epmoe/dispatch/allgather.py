"""The all-gather / reduce-scatter backend (vLLM's default): no per-destination counts.

Each rank gathers the tokens and routing of its whole EP group, runs its local
experts on every gathered token that chose one, and the partial outputs return
by reduce-scatter: each rank receives, for its own tokens, the sum over ranks.
Every token reaches every rank whatever its experts, so it moves more bytes
than ``alltoall``, in exchange for no count exchange and no index planning.
Shape legend: T tokens here, S = all tokens of the group, k top_k, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..collectives import _joins_backward, all_gather_known, gather_ints, reduce_scatter_v
from ..errors import InputError
from .base import META_BYTES, Deferred, Dispatcher, Received, Wire, header_of, settle
from .quant import Relay

__all__ = ["AllGatherDispatcher"]


@dataclass(frozen=True, eq=False)
class AllGatherHandle:
    sizes: list[int]  # [G] tokens of each rank
    row_bytes: int  # bytes of one token row in dispatch
    out_bytes: int  # bytes of one partial-output row in combine


class AllGatherDispatcher(Dispatcher):
    name = "allgather_reducescatter"

    def start(self, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor,
              error: InputError | None = None, more: bool = False) -> Deferred:
        k, group = ids_TK.shape[1], self.group
        # Every rank's [tokens, problem, detail, more]: the header rides with the sizes.
        got = gather_ints([x_TH.shape[0], *header_of(error, more)], x_TH.device, group)
        more = settle([g[1:] for g in got], error, self.state.ep_ranks, self.where)
        sizes = [g[0] for g in got]
        meta_TK2 = torch.cat([weights_TK.float(), ids_TK.float()], dim=1)  # [T, 2k]
        meta_SK2 = all_gather_known(meta_TK2, sizes, group)
        x_SH = self._gather_tokens(x_TH, sizes)
        ids_SK = meta_SK2[:, k:].long()
        here_SK = self.owner_E[ids_SK] == self.me
        local_SK = torch.where(here_SK, self.local_index_E[ids_SK], -1)
        w_SK = torch.where(here_SK, meta_SK2[:, :k], 0.0)
        H = x_TH.shape[1]
        handle = AllGatherHandle(sizes, self.token_bytes(H), self.partial_bytes(H))
        return Deferred(lambda: (Received(x_SH, local_SK, w_SK), handle), more)

    def _gather_tokens(self, x_TH: Tensor, sizes: list[int]) -> Tensor:
        if self.codec is None or self.G == 1:
            return all_gather_known(x_TH, sizes, self.group)
        x_TH = _joins_backward(x_TH)
        raw = all_gather_known(self.codec.encode(x_TH), sizes, self.group)
        group = self.group
        return Relay.apply(x_TH, self.codec.decode(raw),
                           lambda g: reduce_scatter_v(g, sizes, group))

    def combine_start(self, partial_SH: Tensor, handle: AllGatherHandle) -> Deferred:
        return Deferred(lambda: reduce_scatter_v(partial_SH, handle.sizes, self.group))

    def wire(self, handle: AllGatherHandle) -> Wire:
        h, me = handle, self.me
        row = h.row_bytes + META_BYTES * self.config.top_k
        longest = max(h.sizes)  # all_gather pads every rank's block to the longest
        return Wire([h.sizes[me]] * self.G, list(h.sizes), [longest * row] * self.G,
                    [n * h.out_bytes for n in h.sizes])
