"""Pure index logic of dispatch: which (token, rank) pairs travel, and what each row carries.

Hand-worked tests live in ``tests/test_dispatch_index.py``. Shape legend:
T tokens on this rank, k top_k, G ranks in the EP group, E experts,
P = the (token, rank) pairs this rank sends, grouped by destination rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_rows", "pair_hits", "plan_dispatch"]


def pair_hits(expert_ids_TK: Tensor, owner_E: Tensor, ep_size: int) -> Tensor:
    """``hits_TG[t, g]``: token t has at least one of its experts on rank g. An owner of
    ``ep_size`` (the slot of dropped pairs, ``epmoe.capacity``) is no rank.

    >>> pair_hits(torch.tensor([[0, 3], [1, 0]]), torch.tensor([0, 0, 1, 1]), 2)
    tensor([[ True,  True],
            [ True, False]])
    >>> pair_hits(torch.tensor([[0, 4], [4, 4]]), torch.tensor([0, 0, 1, 1, 2]), 2)
    tensor([[ True, False],
            [False, False]])
    """
    T = expert_ids_TK.shape[0]
    hits_TG = torch.zeros((T, ep_size + 1), dtype=torch.bool, device=expert_ids_TK.device)
    return hits_TG.scatter_(1, owner_E[expert_ids_TK], True)[:, :ep_size]


def plan_dispatch(hits_TG: Tensor, n_send: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, rank) pairs to send, in order of (destination rank, token).

    ``n_send`` is ``hits_TG.sum()``, already on the host. Returns
    ``(send_token, send_dest, send_slot)``, each ``[P]``; ``send_slot``
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

    Returns ``(local_PK, w_PK)``, ``[P, k]``; ``w_PK`` is 0 where the slot's
    expert lives on another rank than the row's destination.

    >>> pack_rows(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([[.7, .3]]),
    ...           torch.tensor([[3, 0]]), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))
    (tensor([[-1,  0],
            [ 1, -1]]), tensor([[0.0000, 0.3000],
            [0.7000, 0.0000]]))
    """
    ids_PK = expert_ids_TK[send_token]  # [P, k]
    here_PK = owner_E[ids_PK] == send_dest.unsqueeze(1)  # the slot's expert is on the destination
    local_PK = torch.where(here_PK, local_index_E[ids_PK], -1)
    w_PK = torch.where(here_PK, weights_TK[send_token], 0.0)
    return local_PK, w_PK
