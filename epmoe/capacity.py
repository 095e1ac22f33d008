"""An optional capacity per expert: which (token, choice) pairs are dropped (pure, local).

Off by default (``MoEConfig.capacity_factor = 0``: dropless). With a factor ``cf``,
each rank lets at most ``C = ceil(cf * T * k / E)`` of its own pairs go to each
expert (T: the rank's tokens in this dispatch round, k: top_k, E: experts; the
copies of a replicated expert share its ``C``), as Megatron-LM's
``moe_expert_capacity_factor`` does on the tokens of one rank. So an expert computes
at most ``G * C`` rows over the group, however the router skews, and the decision
needs no communication.

Drop policy (``MoEConfig.drop_policy``), among a rank's pairs that chose an expert:

- ``"probs"`` (default, Megatron's): keep the ``C`` with the largest routing weights
  (ties: the earlier pair, in token order then choice order);
- ``"position"``: keep the first ``C`` in token order (then choice order).

A dropped pair contributes nothing: its weight is 0 and its token does not travel to
that slot. The kept weights are not renormalised (as in Megatron and Switch), so a
token that lost a choice gets less expert output (all of them: only its residual and
shared expert). Gradients flow through the kept pairs only.

Shape legend: T tokens on this rank, k top_k, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import DROP_POLICIES, MoEConfig

__all__ = ["DROP_POLICIES", "capacity_keep", "drop_over_capacity", "expert_capacity"]


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """``ceil(factor * T * k / E)``: pairs one rank may send to one expert.

    >>> [expert_capacity(T, 2, 4, cf) for T, cf in ((10, 1.0), (10, 1.25), (0, 1.0))]
    [5, 7, 0]
    """
    return math.ceil(factor * num_tokens * top_k / num_experts)


def capacity_keep(weights_TK: Tensor, ids_TK: Tensor, num_experts: int, capacity: int,
                  policy: str = "probs") -> Tensor:
    """``keep_TK`` (bool ``[T, k]``): the pairs within each expert's ``capacity``.

    Four tokens, top-1, all on expert 0 of 2, capacity 2:

    >>> w = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    >>> s = torch.zeros(4, 1, dtype=torch.long)
    >>> capacity_keep(w, s, 2, 2, "probs").flatten().tolist()
    [False, True, False, True]
    >>> capacity_keep(w, s, 2, 2, "position").flatten().tolist()
    [True, True, False, False]
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop policy must be one of {list(DROP_POLICIES)}, got {policy!r}")
    T, k = ids_TK.shape
    n = T * k
    ids_N = ids_TK.reshape(-1)
    if policy == "probs":  # highest weight first; ties keep token order (stable)
        order_N = torch.argsort(-weights_TK.detach().reshape(-1).float(), stable=True)
    else:
        order_N = torch.arange(n, device=ids_TK.device)
    by_expert = torch.argsort(ids_N[order_N], stable=True)  # grouped by expert, in priority
    pairs_N = order_N[by_expert]
    counts_E = torch.bincount(ids_N, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_N = torch.arange(n, device=ids_TK.device) - starts_E[ids_N[pairs_N]]  # place in line
    keep_N = torch.zeros(n, dtype=torch.bool, device=ids_TK.device)
    keep_N[pairs_N] = rank_N < capacity
    return keep_N.view(T, k)


def drop_over_capacity(weights_TK: Tensor, ids_TK: Tensor, slots_TK: Tensor,
                       config: MoEConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's step: ``(weights_TK, slots_TK, dropped)`` without the pairs over their
    expert's capacity (the copies of an expert share it); a dropped pair gets weight 0
    and slot P, which no rank owns (``ExpertMap.owner_tensor(drop_slot=True)``).
    ``dropped`` counts them, a tensor (no host sync)."""
    c = config
    keep_TK = capacity_keep(weights_TK, ids_TK, c.num_experts, expert_capacity(
        ids_TK.shape[0], c.top_k, c.num_experts, c.capacity_factor), c.drop_policy)
    return (torch.where(keep_TK, weights_TK, 0.0),
            torch.where(keep_TK, slots_TK, c.num_physical_experts), (~keep_TK).sum())
