"""The next token of each sequence from its logits: greedy, or temperature, top-k, top-p.

Pure local math. Greedy rows are one ``argmax`` for the whole step, unseeded
sampled rows one sort and one draw; a row with a ``seed`` runs alone with its own
``torch.Generator``, so it draws the same tokens whatever else is in the batch
(vLLM's per-request generators). Sampling is in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .types import SamplingParams

__all__ = ["make_generator", "sample"]


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _filtered_probs(logits_V: Tensor, p: SamplingParams) -> Tensor:
    """softmax(logits / temperature) restricted to the top-k and then the top-p tokens."""
    scores = logits_V.float() / p.temperature
    if p.top_k > 0 and p.top_k < scores.shape[0]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it too)
        drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p / sorted_p.sum())
    return probs


def _filtered_probs_batch(logits_RV: Tensor, params: list[SamplingParams]) -> Tensor:
    """:func:`_filtered_probs` of every row at once, each with its own temperature, top-k and
    top-p -> ``[R, V]``: one sort of the rows instead of one per row (a large vocabulary
    makes a per-row sort the cost of a step)."""
    dev = logits_RV.device
    R, V = logits_RV.shape
    temp = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    sorted_RV, order = torch.sort(logits_RV.float() / temp, dim=-1, descending=True)
    kth = sorted_RV.gather(1, (k - 1).clamp(max=V - 1))  # ties with the k-th stay, as above
    sorted_RV = sorted_RV.masked_fill(sorted_RV < kth, float("-inf"))
    p_RV = torch.softmax(sorted_RV, dim=-1)
    p_RV = p_RV.masked_fill(p_RV.cumsum(-1) - p_RV >= top_p, 0.0)
    p_RV = p_RV / p_RV.sum(-1, keepdim=True)
    return torch.zeros_like(p_RV).scatter_(1, order, p_RV)


def sample(logits_RV: Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """``logits_RV [R, V]``: one row per sequence that gets a token this step."""
    out = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        # NOTE: host sync, once per step for the greedy rows together.
        ids = logits_RV[greedy].argmax(dim=-1).tolist()
        for i, t in zip(greedy, ids, strict=True):
            out[i] = t
    free = [i for i, p in enumerate(params) if not p.greedy and generators[i] is None]
    if free:  # unseeded rows together: one sort, one draw, one host sync
        probs_RV = _filtered_probs_batch(logits_RV[free], [params[i] for i in free])
        for i, t in zip(free, torch.multinomial(probs_RV, 1)[:, 0].tolist(), strict=True):
            out[i] = t
    for i, p in enumerate(params):
        if not p.greedy and generators[i] is not None:  # its own stream, as if alone
            probs = _filtered_probs(logits_RV[i], p)
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
