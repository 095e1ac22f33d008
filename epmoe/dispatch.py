"""Dispatch and combine: the only places where the MoE layer talks to other ranks.

``dispatch`` sends every token once to each EP rank that holds at least one of
its experts, with the local ids and routing weights of those experts;
``combine`` brings back one partial output per (token, rank) pair and sums the
pairs of each token. The index logic is pure (:func:`pair_hits`,
:func:`plan_dispatch`, :func:`pack_rows`, :func:`sum_pairs`) and tested
on hand-worked tensors; the collectives are exact-split all-to-alls.

Shape legend:

    T = tokens on this rank     k = top_k      G = ranks in the EP group
    H = hidden size             E = experts    S = min(k, G) slots per token in combine
    P = N_send, the (token, rank) pairs this rank sends, grouped by destination rank
    N_recv = rows this rank receives, grouped by source rank
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .parallel_state import PendingAllToAll, all_to_all_v, all_to_all_v_start, exchange_counts

__all__ = [
    "DispatchHandle", "PendingDispatch", "combine", "dispatch", "dispatch_start", "pack_rows",
    "pair_hits", "plan_dispatch", "sum_pairs",
]


@dataclass(frozen=True, eq=False)
class DispatchHandle:
    """What ``combine`` needs to undo a ``dispatch``."""

    num_tokens: int  # T
    num_slots: int  # S: a token's pairs sit in slots 0..S-1, by destination rank
    send_token: Tensor  # [N_send] source token of every sent row
    send_slot: Tensor  # [N_send] slot of that row in its token's combine buffer
    send_splits: list[int]  # [G] rows sent to each rank
    recv_splits: list[int]  # [G] rows received from each rank
    group: dist.ProcessGroup | None


def pair_hits(expert_ids_TK: Tensor, owner_E: Tensor, ep_size: int) -> Tensor:
    """``hits_TG[t, g]``: token t has at least one of its experts on rank g.

    >>> pair_hits(torch.tensor([[0, 3], [1, 0]]), torch.tensor([0, 0, 1, 1]), 2)
    tensor([[ True,  True],
            [ True, False]])
    """
    T = expert_ids_TK.shape[0]
    hits_TG = torch.zeros((T, ep_size), dtype=torch.bool, device=expert_ids_TK.device)
    return hits_TG.scatter_(1, owner_E[expert_ids_TK], True)


def plan_dispatch(hits_TG: Tensor, n_send: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, rank) pairs to send, in order of (destination rank, token).

    ``n_send`` is ``hits_TG.sum()``, already on the host. Returns
    ``(send_token, send_dest, send_slot)``, each ``[N_send]``; ``send_slot``
    numbers a token's pairs 0, 1, ... by ascending rank. A token whose experts
    share a rank is sent there once.

    >>> plan_dispatch(torch.tensor([[True, True], [True, False]]), 3)
    (tensor([0, 1, 0]), tensor([0, 0, 1]), tensor([0, 0, 1]))
    """
    T = hits_TG.shape[0]
    slot_TG = hits_TG.cumsum(1) - 1  # pair (t, g) is token t's slot-th pair
    # Pairs in (rank, token) order without nonzero() (a second host sync): a
    # stable sort that moves the hits first keeps the row-major order of hits_GT.
    flat_hits = hits_TG.T.reshape(-1)  # [G*T]
    order = torch.argsort((~flat_hits).to(torch.int8), stable=True)[:n_send]
    return order % T, order // T, slot_TG.T.reshape(-1)[order]


def pack_rows(
    send_token: Tensor, send_dest: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor,
    owner_E: Tensor, local_index_E: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per sent row and slot: the expert's local id on the destination (or -1), and its weight.

    Returns ``(local_PK, w_PK)``, ``[N_send, k]``; ``w_PK`` is 0 where the
    slot's expert lives on another rank than the row's destination.

    >>> pack_rows(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([[.7, .3]]),
    ...           torch.tensor([[3, 0]]), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))
    (tensor([[-1,  0],
            [ 1, -1]]), tensor([[0.0000, 0.3000],
            [0.7000, 0.0000]]))
    """
    ids_PK = expert_ids_TK[send_token]  # [N_send, k]
    here_PK = owner_E[ids_PK] == send_dest.unsqueeze(1)  # the slot's expert is on the destination
    local_PK = torch.where(here_PK, local_index_E[ids_PK], -1)
    w_PK = torch.where(here_PK, weights_TK[send_token], 0.0)
    return local_PK, w_PK


class PendingDispatch:
    """A dispatch whose all-to-alls are in flight; ``wait()`` returns what ``dispatch`` does."""

    def __init__(self, x: PendingAllToAll, meta: PendingAllToAll, k: int,
                 handle: DispatchHandle) -> None:
        self._x, self._meta, self._k, self.handle = x, meta, k, handle

    def wait(self) -> tuple[Tensor, Tensor, Tensor, DispatchHandle]:
        x_NH, meta_NK2 = self._x.wait(), self._meta.wait()
        k = self._k
        return x_NH, meta_NK2[:, k:].long(), meta_NK2[:, :k], self.handle


def dispatch_start(
    x_TH: Tensor,
    weights_TK: Tensor,
    expert_ids_TK: Tensor,
    owner_E: Tensor,
    local_index_E: Tensor,
    group: dist.ProcessGroup | None,
    ep_size: int,
) -> PendingDispatch:
    """Send tokens to the ranks of their experts; returns before they arrive.

    ``wait()`` on the result gives ``(x_NH, local_ids_NK, weights_NK, handle)``
    for the ``N_recv`` received rows: the token, and for each of its k slots
    the local expert id on this rank (-1 if that expert lives elsewhere) and its
    fp32 weight. Collectives: one count exchange (waited for: the split sizes
    are needed on the host), then two variable all-to-alls left in flight
    (tokens; weights and ids packed together). Differentiable in ``x`` and
    ``weights``.
    """
    T, k = expert_ids_TK.shape
    hits_TG = pair_hits(expert_ids_TK, owner_E, ep_size)
    send_counts = hits_TG.sum(0)  # [G]
    recv_counts = exchange_counts(send_counts, group)
    # NOTE: host sync, once per dispatch: all-to-all split sizes live on the host.
    splits = torch.cat([send_counts, recv_counts]).tolist()
    send_splits, recv_splits = splits[:ep_size], splits[ep_size:]
    send_token, send_dest, send_slot = plan_dispatch(hits_TG, sum(send_splits))

    local_PK, w_PK = pack_rows(send_token, send_dest, weights_TK, expert_ids_TK, owner_E,
                               local_index_E)
    # Ids travel as fp32 beside the weights (exact below 2**24): one collective, not two.
    meta_PK2 = torch.cat([w_PK.float(), local_PK.float()], dim=1)  # [N_send, 2k]

    x_pending = all_to_all_v_start(x_TH[send_token], send_splits, recv_splits, group)
    meta_pending = all_to_all_v_start(meta_PK2, send_splits, recv_splits, group)
    handle = DispatchHandle(
        num_tokens=T, num_slots=min(k, ep_size), send_token=send_token, send_slot=send_slot,
        send_splits=send_splits, recv_splits=recv_splits, group=group,
    )
    return PendingDispatch(x_pending, meta_pending, k, handle)


def dispatch(
    x_TH: Tensor,
    weights_TK: Tensor,
    expert_ids_TK: Tensor,
    owner_E: Tensor,
    local_index_E: Tensor,
    group: dist.ProcessGroup | None,
    ep_size: int,
) -> tuple[Tensor, Tensor, Tensor, DispatchHandle]:
    """:func:`dispatch_start` and wait: ``(x_NH, local_ids_NK, weights_NK, handle)``."""
    return dispatch_start(x_TH, weights_TK, expert_ids_TK, owner_E, local_index_E, group,
                          ep_size).wait()


def combine(partial_NH: Tensor, handle: DispatchHandle) -> Tensor:
    """Return each received row's partial output to its source; sum each token's pairs.

    ``partial_NH`` is ``[N_recv, H]`` in the order ``dispatch`` received. The
    result is ``[T, H]`` in the tokens' original order, summed in fp32 over
    the token's slots (ascending destination rank) and cast to the input dtype.
    """
    h = handle
    back_PH = all_to_all_v(partial_NH, h.recv_splits, h.send_splits, h.group)  # [N_send, H]
    return sum_pairs(back_PH, h.send_token, h.send_slot, h.num_tokens, h.num_slots)


def sum_pairs(back_PH: Tensor, send_token: Tensor, send_slot: Tensor, T: int, S: int) -> Tensor:
    """Add up each token's returned rows: ``y[t] = sum of back[p] with send_token[p] == t``.

    Each (token, slot) position is filled at most once, then the S slots are
    summed in a fixed order, in fp32: deterministic on every device (an
    ``index_add_`` on CUDA is not). Costs a ``[T, S, H]`` fp32 buffer.

    >>> sum_pairs(torch.tensor([[1.], [2.], [4.]]), torch.tensor([0, 1, 0]),
    ...           torch.tensor([0, 0, 1]), T=3, S=2)
    tensor([[5.],
            [2.],
            [0.]])
    """
    H = back_PH.shape[1]
    buf = back_PH.new_zeros((T * S, H), dtype=torch.float32)
    buf = buf.index_copy(0, send_token * S + send_slot, back_PH.float())
    return buf.view(T, S, H).sum(1).to(back_PH.dtype)
