"""Load-balancing losses and DeepSeek-V3's bias balancing, over a whole EP group.

The math is pure; the two ``..._over_group`` steps the layer calls each add the one
all-reduce of counts that makes them group-wide.

Shape legend: T tokens on this rank, E experts, k top_k. ``Tg`` is the number of
tokens of the whole group in one forward.

- Switch / GShard auxiliary loss: ``E * sum_e f_e * P_e``, with ``f_e`` the share of
  the group's (token, choice) pairs that chose expert e and ``P_e`` the mean over the
  group's tokens of e's router probability (softmax scores; sigmoid scores normalised
  per token). 1.0 when routing is uniform. ``f`` carries no gradient.
- Router z-loss (ST-MoE): the mean over the group's tokens of ``logsumexp(logits)^2``.
- Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores
  only to choose experts; after each step ``b_e += rate * sign(mean load - load_e)``.

Each rank computes its *share* of a loss: its own tokens' terms over the group's
``Tg`` and the group's ``f``. The shares add up over the group's ranks to the loss of
all its tokens, and so do their gradients, like every replicated weight's gradient
in this layer (average them over ranks as DDP does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .collectives import all_reduce_sum
from .config import MoEConfig
from .health import guarded
from .parallel_state import ParallelState

__all__ = ["bias_step", "loss_share_over_group", "router_probs", "switch_aux_share",
           "update_bias_over_group", "z_loss_share"]


def router_probs(logits_TE: Tensor, scoring: str) -> Tensor:
    """Per-token router probabilities ``[T, E]`` in fp32, summing to 1 over experts."""
    if scoring == "softmax":
        return torch.softmax(logits_TE.float(), dim=-1)
    s = torch.sigmoid(logits_TE.float())
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def switch_aux_share(probs_sum_E: Tensor, counts_E: Tensor, group_tokens: int,
                     top_k: int) -> Tensor:
    """This rank's share of the Switch loss: ``E * sum_e f_e * probs_sum_e / Tg``, where
    ``probs_sum_E`` sums this rank's tokens' probabilities and ``counts_E`` (the group's
    choices per expert) gives ``f``.

    >>> float(switch_aux_share(torch.tensor([2.0, 2.0]), torch.tensor([2, 2]), 4, 1))  # even
    1.0
    """
    if group_tokens == 0:
        return probs_sum_E.sum() * 0.0
    E = probs_sum_E.shape[0]
    f_E = counts_E.to(probs_sum_E.dtype) / (group_tokens * top_k)
    return E * (f_E * probs_sum_E).sum() / group_tokens


def z_loss_share(logits_TE: Tensor, group_tokens: int) -> Tensor:
    """This rank's share of the z-loss: ``sum_t logsumexp(logits_t)^2 / Tg``."""
    if group_tokens == 0:
        return logits_TE.float().sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().sum() / group_tokens


def bias_step(bias_E: Tensor, counts_E: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3's update: each expert's bias moves by ``rate`` towards equal load
    (up when it took fewer than the mean tokens, down when more, not at the mean).

    >>> bias_step(torch.zeros(3), torch.tensor([5, 1, 3]), 0.1)
    tensor([-0.1000,  0.1000,  0.0000])
    """
    c = counts_E.double()
    return bias_E + rate * torch.sign(c.mean() - c).to(bias_E.dtype)


def loss_share_over_group(probs_E: Tensor, z_sum: Tensor | None, counts_E: Tensor, tokens: int,
                          config: MoEConfig, state: ParallelState, where: str) -> Tensor:
    """This rank's share of ``aux_loss_coef * Switch + z_loss_coef * z`` over the group's
    tokens, from this rank's sums (probabilities ``[E]``, logsumexp squares) and choices
    per expert ``[E]``: one all-reduce of those counts and the token count."""
    c, s = config, state
    mine = torch.cat([counts_E, counts_E.new_tensor([tokens])])
    with guarded(s.heartbeat, where, s.ep_ranks):
        group = all_reduce_sum(mine, s.ep_group)
    group_E, Tg = group[:-1], int(group[-1])  # NOTE: host sync, when the losses are on
    loss = c.aux_loss_coef * switch_aux_share(probs_E, group_E, Tg, c.top_k)
    if c.z_loss_coef:
        loss = loss + c.z_loss_coef * z_sum / max(Tg, 1)
    return loss


@torch.no_grad()
def update_bias_over_group(bias_E: Tensor, counts_E: Tensor, config: MoEConfig,
                           state: ParallelState, where: str) -> Tensor:
    """:func:`bias_step` in place on ``bias_E`` from the group's sum of ``counts_E``
    (returned): one all-reduce."""
    s = state
    with guarded(s.heartbeat, where, s.ep_ranks):
        group_E = all_reduce_sum(counts_E, s.ep_group)
    bias_E.copy_(bias_step(bias_E, group_E, config.bias_update_rate))
    return group_E
