"""The next token of each sequence from its logits: greedy, or temperature, top-k, top-p.

Pure local math. Greedy rows are one ``argmax`` for the whole step; sampled
rows run one at a time, each with its own ``torch.Generator`` when it has a
``seed``, so a seeded request draws the same tokens whatever else is in the
batch (vLLM's per-request generators). Sampling is in fp32.
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
    for i, p in enumerate(params):
        if not p.greedy:
            probs = _filtered_probs(logits_RV[i], p)
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
