"""The router: scores over experts, top-k choice, optional renormalisation.

Pure local math, replicated on every rank; each rank routes its own tokens.
Shape legend: T = tokens on this rank, H = hidden size, E = experts, k = top_k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import MoEConfig

__all__ = ["route"]


def route(x_TH: Tensor, router_weight_EH: Tensor, config: MoEConfig) -> tuple[Tensor, Tensor]:
    """Choose ``top_k`` experts per token.

    Returns ``(weights_TK, expert_ids_TK)``: fp32 routing weights and global
    expert ids (int64), both ``[T, k]``, experts in descending score order.

    The logits are computed in the tokens' dtype, as an ``nn.Linear`` router in
    a Hugging Face model does; scores, top-k and renormalisation run in fp32.
    """
    logits_TE = x_TH @ router_weight_EH.T
    if config.scoring == "softmax":
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    else:  # "sigmoid": independent per-expert gates (DeepSeek-V3 style)
        scores_TE = torch.sigmoid(logits_TE.float())
    weights_TK, expert_ids_TK = torch.topk(scores_TE, config.top_k, dim=-1)
    if config.renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, expert_ids_TK
