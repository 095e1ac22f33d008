"""Which rank holds which expert: one pure function, used by the layer, the demo and the tests.

Experts are always named by their global id ``0 .. E-1``. A rank stores its
experts stacked in *local* order; ``local_index[e]`` is expert e's row there.
When ``E % ep_size != 0`` the first ``E % ep_size`` ranks hold one more expert.

Example, 10 experts on 4 ranks::

    linear:       rank 0: 0 1 2   rank 1: 3 4 5   rank 2: 6 7     rank 3: 8 9
    round_robin:  rank 0: 0 4 8   rank 1: 1 5 9   rank 2: 2 6     rank 3: 3 7
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import PLACEMENTS

__all__ = ["ExpertMap", "expert_map"]


@dataclass(frozen=True)
class ExpertMap:
    """The owner rank and local index of every global expert."""

    num_experts: int  # E
    ep_size: int  # ranks in the EP group
    owner: tuple[int, ...]  # [E] ep_rank holding each expert
    local_index: tuple[int, ...]  # [E] row of the expert in its owner's stacked weights

    def experts_on(self, ep_rank: int) -> tuple[int, ...]:
        """Global ids held by ``ep_rank``, in local order."""
        held = [e for e in range(self.num_experts) if self.owner[e] == ep_rank]
        return tuple(sorted(held, key=lambda e: self.local_index[e]))

    def num_local(self, ep_rank: int) -> int:
        return sum(1 for o in self.owner if o == ep_rank)

    def owner_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.owner, dtype=torch.long, device=device)  # [E]

    def local_index_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.local_index, dtype=torch.long, device=device)  # [E]


def expert_map(num_experts: int, ep_size: int, placement: str = "linear") -> ExpertMap:
    """Place ``num_experts`` experts on ``ep_size`` ranks (see the module docstring)."""
    if num_experts < 1 or ep_size < 1:
        raise ValueError(f"num_experts and ep_size must be >= 1, got {num_experts}, {ep_size}")
    if num_experts < ep_size:
        raise ValueError(
            f"num_experts={num_experts} must be >= ep_size={ep_size}: every rank holds an expert"
        )
    if placement == "linear":
        base, extra = divmod(num_experts, ep_size)
        owner: list[int] = []
        for r in range(ep_size):
            owner += [r] * (base + (1 if r < extra else 0))
        local = []
        for e in range(num_experts):
            local.append(e - owner.index(owner[e]))  # offset from the rank's first expert
    elif placement == "round_robin":
        owner = [e % ep_size for e in range(num_experts)]
        local = [e // ep_size for e in range(num_experts)]
    else:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    return ExpertMap(num_experts, ep_size, tuple(owner), tuple(local))
