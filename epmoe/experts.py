"""Expert math on one rank: initialise an expert, run the local experts on received tokens.

Pure local code, no collectives. Shape legend:

    N = token rows received by this rank     k = top_k slots per row
    M = (row, slot) pairs that name a local expert, sorted by local expert
    e = local experts    H = hidden size    F = intermediate size per expert
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MoEConfig

__all__ = [
    "expert_mlp",
    "init_expert",
    "init_router",
    "local_experts_forward",
    "sort_by_local_expert",
]


def _generator(seed: int, stream: int) -> torch.Generator:
    # One independent stream per (seed, tensor owner): stream 0 is the router,
    # stream 1 + e is global expert e. Any rank can build any expert alone.
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def _uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def init_router(config: MoEConfig, seed: int) -> Tensor:
    """Router weight ``[E, H]`` (fp32, CPU), the same on every rank for a seed."""
    return _uniform((config.num_experts, config.hidden_size), config.hidden_size,
                    _generator(seed, 0))


def init_expert(config: MoEConfig, seed: int, expert: int) -> tuple[Tensor, Tensor, Tensor]:
    """Weights of global expert ``expert``: gate ``[F, H]``, up ``[F, H]``, down ``[H, F]``.

    Depends only on (seed, expert), so a rank builds its own experts without
    materialising anyone else's and the result matches a full single-device init.
    """
    H, Fi = config.hidden_size, config.intermediate_size
    gen = _generator(seed, 1 + expert)
    return _uniform((Fi, H), H, gen), _uniform((Fi, H), H, gen), _uniform((H, Fi), Fi, gen)


def expert_mlp(x_MH: Tensor, gate_FH: Tensor, up_FH: Tensor, down_HF: Tensor,
               activation: str) -> Tensor:
    """One gated-MLP expert: ``down(act(x @ gate^T) * (x @ up^T))`` -> ``[M, H]``."""
    act = F.silu if activation == "silu" else F.gelu
    return (act(x_MH @ gate_FH.T) * (x_MH @ up_FH.T)) @ down_HF.T


def sort_by_local_expert(local_ids_NK: Tensor, num_local: int) -> tuple[Tensor, list[int]]:
    """Order the (row, slot) pairs that name a local expert by that expert.

    ``local_ids_NK[n, j]`` is the local expert of slot j of received row n, or
    -1 when that slot's expert lives elsewhere. Returns ``pair_M``, flat indices
    ``n * k + j`` grouped by local expert (rows ascending inside a group), and
    the number of pairs per local expert.

    >>> sort_by_local_expert(torch.tensor([[1, -1], [0, 1]]), 2)
    (tensor([2, 0, 3]), [1, 2])
    """
    ids = local_ids_NK.flatten()  # [N*k]
    key = torch.where(ids >= 0, ids, num_local)  # absent slots sort last, in bucket e
    order = torch.argsort(key, stable=True)  # [N*k]
    # NOTE: host sync, once per forward: the slice bounds of every local expert.
    counts = torch.bincount(key, minlength=num_local + 1).tolist()
    return order[: sum(counts[:num_local])], counts[:num_local]


def local_experts_forward(
    x_NH: Tensor,
    local_ids_NK: Tensor,
    weights_NK: Tensor,
    w_gate_eFH: Tensor,
    w_up_eFH: Tensor,
    w_down_eHF: Tensor,
    activation: str,
) -> tuple[Tensor, list[int]]:
    """Each received row's weighted sum over the slots whose expert is local.

    Returns ``(partial_NH, counts)``: ``[N, H]`` in ``x``'s dtype, and the
    number of (row, slot) pairs each local expert computed.

    One matrix product per local expert over a contiguous slice of the sorted
    rows; no loop over tokens. Weighting and the sum over slots run in fp32
    (the reference does the same), the result is cast back to ``x``'s dtype.
    """
    N, k = local_ids_NK.shape
    pair_M, counts = sort_by_local_expert(local_ids_NK, w_gate_eFH.shape[0])
    x_MH = x_NH[pair_M // k]  # copy: rows gathered into expert order
    outs, start = [], 0
    for e, n in enumerate(counts):  # loop over experts, not tokens
        # Empty slices run too: every rank's graph then has the same shape, so
        # every rank joins the same collectives in backward (see all_to_all_v).
        xs = x_MH[start : start + n]
        outs.append(expert_mlp(xs, w_gate_eFH[e], w_up_eFH[e], w_down_eHF[e], activation))
        start += n
    H = x_NH.shape[1]
    y_MH = torch.cat(outs)
    weighted_MH = y_MH.float() * weights_NK.flatten()[pair_M].float().unsqueeze(1)
    # Scatter back to (row, slot) positions, then sum the k slots in a fixed order:
    # unique indices and a plain sum keep this deterministic on every device.
    slots = weighted_MH.new_zeros((N * k, H)).index_copy(0, pair_M, weighted_MH)
    return slots.view(N, k, H).sum(1).to(x_NH.dtype), counts
