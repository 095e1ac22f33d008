"""Which rank holds which expert: pure functions, used by the layer, the demo and the tests.

Experts are named by their global (logical) id ``0 .. E-1``. A rank stores its
experts stacked in *local* order, one row per *slot*. Without redundant experts
there is one slot per expert and slot ids are expert ids: ``owner[e]`` is the
rank of expert e, ``local_index[e]`` its row there. When ``E % ep_size != 0``
the first ``E % ep_size`` ranks hold one more expert.

Example, 10 experts on 4 ranks::

    linear:       rank 0: 0 1 2   rank 1: 3 4 5   rank 2: 6 7     rank 3: 8 9
    round_robin:  rank 0: 0 4 8   rank 1: 1 5 9   rank 2: 2 6     rank 3: 3 7

With ``R`` redundant experts there are ``P = E + R`` physical slots, ``P /
ep_size`` on every rank, numbered rank by rank (rank g holds slots ``g * S ..
(g + 1) * S - 1``, as in ``epmoe.eplb``); ``phy2log[p]`` is the expert in slot
p. Before any load is known, each rank holds the experts of the layout above,
and its free slots take copies of the experts of the rank before it (those with
the fewest copies first), so that under uniform routing the ranks do the same
work (a copy takes half its expert's tokens). Example, 8 experts and 4 redundant
on 4 ranks, linear::

    rank 0: 0 1 6   rank 1: 2 3 0   rank 2: 4 5 2   rank 3: 6 7 4

A token that chooses a replicated expert goes to one of its copies
(:func:`choose_replicas`): the n-th choice of that expert on a rank goes to copy
``(n + ep_rank) % copies``, so the copies share the load evenly and the choice
depends only on the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import PLACEMENTS

__all__ = ["ExpertMap", "choose_replicas", "expert_map", "f_slices", "map_of_slots",
           "tensor_parallel_map"]


@dataclass(frozen=True)
class ExpertMap:
    """The logical expert of every physical slot, and the rank and row of each slot.

    Shape legend: E logical experts, P physical slots (``P == E`` and ``phy2log``
    the identity without redundant experts), G ranks, R most copies of an expert."""

    num_experts: int  # E
    ep_size: int  # G, ranks in the EP group
    phy2log: tuple[int, ...]  # [P] logical expert held in each slot
    owner: tuple[int, ...]  # [P] ep_rank holding each slot
    local_index: tuple[int, ...]  # [P] row of the slot in its owner's stacked weights

    @property
    def num_slots(self) -> int:
        return len(self.phy2log)

    @property
    def identity(self) -> bool:
        """Slot ids are expert ids (one copy of each, slot e holds expert e): the router's
        ids go to the dispatch as they are."""
        return self.phy2log == tuple(range(self.num_experts))

    def slots_on(self, ep_rank: int) -> tuple[int, ...]:
        """Slot ids held by ``ep_rank``, in local order."""
        held = [p for p in range(self.num_slots) if self.owner[p] == ep_rank]
        return tuple(sorted(held, key=lambda p: self.local_index[p]))

    def experts_on(self, ep_rank: int) -> tuple[int, ...]:
        """Logical ids of the experts in ``ep_rank``'s rows, in local order (an expert
        may appear twice when two of its copies share a rank)."""
        return tuple(self.phy2log[p] for p in self.slots_on(ep_rank))

    def num_local(self, ep_rank: int) -> int:
        return sum(1 for o in self.owner if o == ep_rank)

    def copies(self) -> tuple[int, ...]:
        """``[E]`` copies of each logical expert."""
        cnt = [0] * self.num_experts
        for e in self.phy2log:
            cnt[e] += 1
        return tuple(cnt)

    def log2phy(self) -> tuple[tuple[int, ...], ...]:
        """``[E][copies]`` each logical expert's slots, ascending."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.phy2log):
            out[e].append(p)
        return tuple(tuple(s) for s in out)

    def owner_tensor(self, device: torch.device | str = "cpu", drop_slot: bool = False) -> Tensor:
        """``[P]`` the rank of every slot; with ``drop_slot``, ``[P + 1]``: one more slot,
        owned by no rank (``ep_size``), for the pairs a capacity drops (``epmoe.capacity``)."""
        return torch.tensor([*self.owner, *[self.ep_size] * drop_slot], dtype=torch.long,
                            device=device)

    def local_index_tensor(self, device: torch.device | str = "cpu",
                           drop_slot: bool = False) -> Tensor:
        """``[P]`` the row of every slot in its owner's stack (``-1`` for the drop slot)."""
        return torch.tensor([*self.local_index, *[-1] * drop_slot], dtype=torch.long,
                            device=device)

    def replica_tables(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(log2phy_ER, copies_E)`` for :func:`choose_replicas`; ``-1`` pads ``log2phy``."""
        slots = self.log2phy()
        R = max(len(s) for s in slots)
        table = torch.full((self.num_experts, R), -1, dtype=torch.long)
        for e, s in enumerate(slots):
            table[e, : len(s)] = torch.tensor(s, dtype=torch.long)
        return table.to(device), torch.tensor(self.copies(), dtype=torch.long, device=device)

    def rank_loads(self, load_E: Tensor) -> Tensor:
        """Tokens per rank ``[G]`` (float64) for tokens per expert ``load_E``, each expert's
        load shared evenly by its copies (what :func:`choose_replicas` does)."""
        cnt = torch.tensor(self.copies(), dtype=torch.float64)
        phy = torch.tensor(self.phy2log)
        per_slot = load_E.double().cpu()[phy] / cnt[phy]
        return torch.zeros(self.ep_size, dtype=torch.float64).index_add_(
            0, torch.tensor(self.owner), per_slot)

    def balancedness(self, load_E: Tensor) -> float:
        """Mean over max of the tokens per rank (1.0: even, or no tokens at all)."""
        t = self.rank_loads(load_E)
        return float(t.mean() / t.max()) if float(t.max()) > 0 else 1.0


def expert_map(num_experts: int, ep_size: int, placement: str = "linear",
               num_redundant: int = 0) -> ExpertMap:
    """Place ``num_experts`` experts, and ``num_redundant`` extra copies, on ``ep_size``
    ranks (see the module docstring)."""
    if num_experts < 1 or ep_size < 1 or num_redundant < 0:
        raise ValueError(f"num_experts and ep_size must be >= 1 and num_redundant >= 0, got "
                         f"{num_experts}, {ep_size}, {num_redundant}")
    if num_experts < ep_size:
        raise ValueError(
            f"num_experts={num_experts} must be >= ep_size={ep_size}: every rank holds an expert"
        )
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    E, G = num_experts, ep_size
    if num_redundant:
        P = E + num_redundant
        if P % G:
            raise ValueError(f"{E} experts + {num_redundant} redundant = {P} slots do not "
                             f"divide evenly over {G} ranks")
        base = expert_map(E, G, placement)
        held = [list(base.experts_on(g)) for g in range(G)]
        return map_of_slots(E, G, _with_copies(held, P // G))
    if placement == "linear":
        base, extra = divmod(E, G)
        owner: list[int] = []
        for r in range(G):
            owner += [r] * (base + (1 if r < extra else 0))
        local = [e - owner.index(owner[e]) for e in range(E)]  # offset from the rank's first
    else:  # round_robin
        owner = [e % G for e in range(E)]
        local = [e // G for e in range(E)]
    return ExpertMap(E, G, tuple(range(E)), tuple(owner), tuple(local))


def _with_copies(held: list[list[int]], slots: int) -> list[int]:
    """``phy2log`` of the rank-by-rank layout ``held`` whose free slots (up to ``slots`` per
    rank) take copies: each the expert with the fewest copies so far among those of the
    rank before (then the ranks before that), not yet on this rank."""
    G = len(held)
    copies = {e: 1 for h in held for e in h}
    out = []
    for g in range(G):
        mine = list(held[g])
        donors = [e for d in range(1, G + 1) for e in held[(g - d) % G]]
        for _ in range(slots - len(held[g])):
            fresh = [e for e in donors if e not in mine] or donors  # (one rank: its own)
            e = min(fresh, key=lambda x: copies[x])  # ties: the earliest donor
            copies[e] += 1
            mine.append(e)
        out += mine
    return out


def f_slices(intermediate_size: int, size: int) -> list[tuple[int, int]]:
    """Tensor parallelism: rank g holds columns ``start .. stop - 1`` of every expert's F
    (the first ``F % size`` ranks one more).

    >>> f_slices(10, 4)
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    base, extra = divmod(intermediate_size, size)
    out, start = [], 0
    for g in range(size):
        stop = start + base + (1 if g < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def tensor_parallel_map(num_experts: int, size: int, rank: int) -> ExpertMap:
    """Tensor parallelism as this rank sees it: every expert (a slice of each) is here."""
    E = num_experts
    return ExpertMap(E, size, tuple(range(E)), (rank,) * E, tuple(range(E)))


def map_of_slots(num_experts: int, ep_size: int, phy2log: list[int] | tuple[int, ...] | Tensor
                 ) -> ExpertMap:
    """The map of a rank-by-rank slot layout (``epmoe.eplb``'s): slot p on rank ``p // S``,
    row ``p % S``, ``S = P // ep_size``; ``phy2log [P]`` must hold every expert."""
    phy = [int(e) for e in (phy2log.tolist() if isinstance(phy2log, Tensor) else phy2log)]
    P = len(phy)
    if P % ep_size or P < num_experts:
        raise ValueError(f"{P} slots must be >= the {num_experts} experts and divide evenly "
                         f"over {ep_size} ranks")
    if any(not 0 <= e < num_experts for e in phy) or len(set(phy)) != num_experts:
        missing = sorted(set(range(num_experts)) - set(phy))
        raise ValueError(f"phy2log must hold every expert 0..{num_experts - 1} (and nothing "
                         f"else) at least once; missing {missing[:8]}")
    S = P // ep_size
    return ExpertMap(num_experts, ep_size, tuple(phy), tuple(p // S for p in range(P)),
                     tuple(p % S for p in range(P)))


def choose_replicas(ids_TK: Tensor, log2phy_ER: Tensor, copies_E: Tensor,
                    offset: int = 0) -> Tensor:
    """The slot each (token, choice) goes to: ``[T, k]`` slot ids for expert ids ``[T, k]``.

    The n-th choice of expert e (in row-major order of ``ids_TK``) takes copy ``(n +
    offset) % copies[e]``: a rank's choices of an expert split over its copies within
    one, whatever the tokens. Pure and on the device (a sort of ``T * k`` ids, no host
    sync).

    >>> choose_replicas(torch.tensor([[0, 1], [0, 2], [0, 1]]),
    ...                 torch.tensor([[0, 3], [1, -1], [2, -1]]), torch.tensor([2, 1, 1]))
    tensor([[0, 1],
            [3, 2],
            [0, 1]])
    """
    flat = ids_TK.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=log2phy_ER.shape[0])
    starts = counts.cumsum(0) - counts  # first sorted position of each expert
    occurrence = torch.empty_like(flat)
    occurrence[order] = torch.arange(n, device=flat.device) - starts[flat[order]]
    copy = (occurrence + offset) % copies_E[flat]
    return log2phy_ER[flat, copy].view_as(ids_TK)
