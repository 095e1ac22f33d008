"""The exact-split backend: counts exchanged, then variable-size all-to-alls.

Every token travels once to each rank that holds at least one of its experts,
with the local ids and fp32 weights of those experts; it comes back once, as
the weighted sum of those experts' outputs. Bytes on the wire are the
minimum: one row per (token, remote rank that holds one of its experts), plus
8 bytes of routing per slot. Shape legend as in ``index.py``; N = rows received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..collectives import _all_to_all, _joins_backward, all_to_all_v_start, exchange_counts
from ..errors import InputError
from ..ops import sum_rows
from .base import META_BYTES, Deferred, Dispatcher, Received, Wire, header_of, settle
from .index import pack_rows, pair_hits, plan_dispatch
from .quant import Relay

__all__ = ["AllToAllDispatcher"]


@dataclass(frozen=True, eq=False)
class AllToAllHandle:
    num_tokens: int  # T
    num_slots: int  # S = min(k, G): a token's pairs sit in slots 0..S-1, by destination rank
    send_token: Tensor  # [P] source token of every sent row
    send_slot: Tensor  # [P] slot of that row in its token's sum
    send_splits: list[int]  # [G] rows sent to each rank
    recv_splits: list[int]  # [G] rows received from each rank
    row_bytes: int  # bytes of one token row on the wire in dispatch (encoded if so)
    out_bytes: int  # bytes of one partial-output row in combine


class AllToAllDispatcher(Dispatcher):
    name = "alltoall"

    def start(self, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor,
              error: InputError | None = None, more: bool = False) -> Deferred:
        T, k = ids_TK.shape
        G, group = self.G, self.group
        hits_TG = pair_hits(ids_TK, self.owner_E, G)
        # Per destination: [rows, problem, detail, more]; the header rides with the counts.
        header = torch.tensor(header_of(error, more), device=x_TH.device)
        send_G4 = torch.cat([hits_TG.sum(0, keepdim=True).T, header.expand(G, 3)], dim=1)
        recv_G4 = exchange_counts(send_G4, group)
        # NOTE: host sync, once per dispatch: all-to-all split sizes live on the host.
        both = torch.cat([send_G4, recv_G4]).tolist()
        more = settle([r[1:] for r in both[G:]], error, self.state.ep_ranks, self.where)
        send, recv = [r[0] for r in both[:G]], [r[0] for r in both[G:]]
        send_token, send_dest, send_slot = plan_dispatch(hits_TG, sum(send))
        local_PK, w_PK = pack_rows(send_token, send_dest, weights_TK, ids_TK, self.owner_E,
                                   self.local_index_E)
        # Ids travel as fp32 beside the weights (exact below 2**24): one collective, not two.
        meta_PK2 = torch.cat([w_PK.float(), local_PK.float()], dim=1)  # [P, 2k]
        x_PH = x_TH.index_select(0, send_token)
        H = x_TH.shape[1]
        handle = AllToAllHandle(T, min(k, G), send_token, send_slot, send, recv,
                                self.token_bytes(H), self.partial_bytes(H))
        if self.codec is None and G > 1 and not torch.is_grad_enabled():
            # Inference: one all-to-all instead of two, the fp32 routing riding as extra
            # columns of the rows, its bytes reinterpreted in x's dtype (which autograd
            # cannot follow, hence not under autograd). Each collective costs ~1 ms on
            # this 2-core CPU when the ranks compute between them (gloo's wake-ups), a
            # fifth of a decode step's MoE layer; the copies cost microseconds.
            both = torch.cat([x_PH, meta_PK2.view(x_PH.dtype)], dim=1)  # [P, H + M]
            pending = all_to_all_v_start(both, send, recv, group)

            def received():
                out = pending.wait()
                meta_NK2 = out[:, H:].contiguous().view(torch.float32)
                return Received(out[:, :H].contiguous(), meta_NK2[:, k:].long(),
                                meta_NK2[:, :k]), handle

            return Deferred(received, more)
        x_pending = self._send_tokens(x_PH, send, recv)
        meta_pending = all_to_all_v_start(meta_PK2, send, recv, group)

        def received():
            meta_NK2 = meta_pending.wait()
            return Received(x_pending.wait(), meta_NK2[:, k:].long(), meta_NK2[:, :k]), handle

        return Deferred(received, more)

    def _send_tokens(self, x_PH: Tensor, send: list[int], recv: list[int]):
        if self.codec is None or self.G == 1:
            return all_to_all_v_start(x_PH, send, recv, self.group)
        x_PH = _joins_backward(x_PH)
        raw = all_to_all_v_start(self.codec.encode(x_PH), send, recv, self.group)
        group = self.group

        def decoded():
            out = self.codec.decode(raw.wait())
            return Relay.apply(x_PH, out, lambda g: _all_to_all(g, recv, send, group))

        return Deferred(decoded)

    def combine_start(self, partial_NH: Tensor, handle: AllToAllHandle) -> Deferred:
        h = handle
        back = all_to_all_v_start(partial_NH, h.recv_splits, h.send_splits, self.group)

        def summed() -> Tensor:
            back_PH = back.wait()
            return sum_rows(back_PH, h.send_token, h.send_slot, h.num_tokens, h.num_slots)

        return Deferred(summed)

    def wire(self, handle: AllToAllHandle) -> Wire:
        h = handle
        meta = META_BYTES * self.config.top_k
        return Wire(list(h.send_splits), list(h.recv_splits),
                    [n * (h.row_bytes + meta) for n in h.send_splits],
                    [n * h.out_bytes for n in h.recv_splits])
