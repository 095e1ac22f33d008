"""The router: scores over experts, (group-limited) top-k choice, weights.

Pure local math, replicated on every rank; each rank routes its own tokens.
Shape legend: T = tokens on this rank, H = hidden size, E = experts, k = top_k,
G = expert groups (``n_group``), E/G experts per group.

One function covers the routers of the supported families, by config field:

- Mixtral, Qwen2/3-MoE, OLMoE: softmax, top-k, optional renormalisation.
- GPT-OSS: router bias; top-k of the logits then a softmax over the k, which
  is the same as softmax, top-k, renormalise.
- DeepSeek-V3: fp32 sigmoid scores; ``score_correction_bias`` added only to
  choose; the best ``topk_group`` of ``n_group`` groups by the sum of their two
  best scores; renormalised, times ``routed_scaling_factor``.
- DeepSeek-V2: fp32 softmax; groups by their best score (others' scores
  masked to 0); times ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MoEConfig
from .ops import by_tiles

__all__ = ["route"]


def route(
    x_TH: Tensor,
    router_weight_EH: Tensor,
    config: MoEConfig,
    router_bias_E: Tensor | None = None,
    score_correction_bias_E: Tensor | None = None,
    return_logits: bool = False,
) -> tuple[Tensor, ...]:
    """Choose ``top_k`` experts per token.

    Returns ``(weights_TK, expert_ids_TK)``: fp32 routing weights and global
    expert ids (int64), both ``[T, k]``, in descending order of the choice score;
    with ``return_logits``, also the logits ``[T, E]`` (a NaN or Inf anywhere in a
    token makes every logit of that token non-finite: the cheap place to look).

    Logits are computed in ``config.router_dtype`` (the tokens' dtype, as an
    ``nn.Linear`` router in a Hugging Face model, or fp32); scores, top-k and
    weights run in fp32. With ``config.batch_invariant``, in fixed tiles of tokens
    (``ops.by_tiles``): a token's choice then has the same bits whatever the others.
    """
    if config.batch_invariant:
        return by_tiles(lambda t: _route(t, router_weight_EH, config, router_bias_E,
                                         score_correction_bias_E, return_logits), x_TH)
    return _route(x_TH, router_weight_EH, config, router_bias_E, score_correction_bias_E,
                  return_logits)


def _route(x_TH: Tensor, router_weight_EH: Tensor, config: MoEConfig,
           router_bias_E: Tensor | None, score_correction_bias_E: Tensor | None,
           return_logits: bool) -> tuple[Tensor, ...]:
    c = config
    if c.router_fp32:
        x_TH, router_weight_EH = x_TH.float(), router_weight_EH.float()
        router_bias_E = None if router_bias_E is None else router_bias_E.float()
    logits_TE = F.linear(x_TH, router_weight_EH, router_bias_E)
    if c.scoring == "softmax":
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    else:  # "sigmoid": independent per-expert gates
        scores_TE = torch.sigmoid(logits_TE.float())

    choice_TE = scores_TE
    if score_correction_bias_E is not None:  # steers the choice, never the weights
        choice_TE = scores_TE + score_correction_bias_E.float()
    if c.n_group > 1:
        keep_TE = _best_groups(choice_TE, c)
        fill = float("-inf") if c.group_scoring == "top2_sum" else 0.0
        choice_TE = choice_TE.masked_fill(~keep_TE, fill)
        scores_TE = scores_TE.masked_fill(~keep_TE, 0.0)  # a masked pick (V2 only) weighs 0

    expert_ids_TK = torch.topk(choice_TE, c.top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, expert_ids_TK)
    if c.renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if c.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * c.routed_scaling_factor
    if return_logits:
        return weights_TK, expert_ids_TK, logits_TE
    return weights_TK, expert_ids_TK


def _best_groups(choice_TE: Tensor, c: MoEConfig) -> Tensor:
    """``keep_TE[t, e]``: expert e is in one of token t's ``topk_group`` best groups."""
    T, E = choice_TE.shape
    grouped_TGe = choice_TE.view(T, c.n_group, E // c.n_group)
    if c.group_scoring == "top2_sum":
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    else:  # "max"
        group_TG = grouped_TGe.max(dim=-1).values
    best_Tg = torch.topk(group_TG, c.topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_Tg, True)
    return keep_TG.repeat_interleave(E // c.n_group, dim=1)
