"""What the Hugging Face tests run, on each rank and on transformers alike.

Rank r's prompts (a batch and a number of new tokens, different on every rank so
that the ranks stop at different steps), their logits and greedy tokens, and the
expert tensors a rank read from the checkpoint.
"""

from __future__ import annotations

import contextlib
import re

import torch


def rank_inputs(rank: int) -> tuple[torch.Tensor, int]:
    """Rank r's prompt batch and new-token count: all different, so ranks stop apart."""
    batch, length = (1, 5) if rank % 2 == 0 else (2, 9)
    ids = (torch.arange(batch * length).view(batch, length) * (7 + 2 * rank) + rank) % 256
    return ids, [6, 2, 9][rank % 3]


def logits_and_tokens(model, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s prompts through ``model`` (epmoe's, in its EP session, or
    transformers'): the logits of one forward and the greedy tokens of ``generate``."""
    ids, new = rank_inputs(rank)
    session = model.epmoe.session() if hasattr(model, "epmoe") else contextlib.nullcontext()
    with session, torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits, model.generate(input_ids=ids, max_new_tokens=new, do_sample=False)


def expert_reads(model) -> list[tuple[str, tuple[int, int] | None]]:
    """The expert tensors an epmoe model's rank read: ``(name, None)`` for a tensor of one
    expert, ``(name, (a, b))`` for rows ``[a, b)`` of a stacked one."""
    return [(k, rows) for k, rows in model.epmoe.reads
            if rows is not None or re.search(r"\.experts\.\d+\.", k)]
