"""Expert math on one rank: initialise experts, run the local experts on received tokens.

Pure local code, no collectives. Shape legend:

    N = token rows received by this rank     k = top_k slots per row
    M = (row, slot) pairs that name a local expert, sorted by local expert
    e = local experts    E = all experts    H = hidden size
    F = intermediate size per expert         Fs = shared-expert intermediate size
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MoEConfig

__all__ = [
    "ExpertWeights",
    "expert_mlp",
    "gated_activation",
    "init_expert",
    "init_router",
    "init_shared",
    "local_experts_forward",
    "sort_by_local_expert",
]

GLU = Callable[[Tensor, Tensor], Tensor]  # (gate activations, up activations) -> [M, F]


class ExpertWeights(NamedTuple):
    """Stacked weights of some experts, in ``nn.Linear`` orientation."""

    w_gate: Tensor  # [e, F, H]
    w_up: Tensor  # [e, F, H]
    w_down: Tensor  # [e, H, F]
    b_gate: Tensor | None = None  # [e, F] (expert_bias only)
    b_up: Tensor | None = None  # [e, F]
    b_down: Tensor | None = None  # [e, H]


def gated_activation(config: MoEConfig) -> GLU:
    """The gated product of an expert: ``act(gate) * up`` or GPT-OSS's clamped SwiGLU."""
    if config.activation == "silu":
        return lambda g, u: F.silu(g) * u
    if config.activation == "gelu":
        return lambda g, u: F.gelu(g) * u
    alpha, limit = config.swiglu_alpha, config.swiglu_limit

    def clamped_swiglu(g: Tensor, u: Tensor) -> Tensor:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))

    return clamped_swiglu


def expert_mlp(x_MH: Tensor, gate_FH: Tensor, up_FH: Tensor, down_HF: Tensor, glu: GLU,
               b_gate: Tensor | None = None, b_up: Tensor | None = None,
               b_down: Tensor | None = None) -> Tensor:
    """One gated-MLP expert: ``down(glu(gate(x), up(x)))`` -> ``[M, H]``."""
    return F.linear(glu(F.linear(x_MH, gate_FH, b_gate), F.linear(x_MH, up_FH, b_up)),
                    down_HF, b_down)


# --------------------------------------------------------------------------- init


def _generator(seed: int, stream: int) -> torch.Generator:
    # One independent stream per (seed, owner): stream 0 is the router, 1 + e
    # is global expert e, 1 + E the shared expert. Any rank builds any part alone.
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def _uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def init_router(config: MoEConfig, seed: int) -> dict[str, Tensor]:
    """``router_weight [E, H]`` and, when configured, ``router_bias`` and
    ``score_correction_bias`` ``[E]``: fp32 on the CPU, the same on every rank."""
    E, H = config.num_experts, config.hidden_size
    gen = _generator(seed, 0)
    out = {"router_weight": _uniform((E, H), H, gen)}
    if config.router_bias:
        out["router_bias"] = _uniform((E,), H, gen)
    if config.score_correction_bias:
        out["score_correction_bias"] = 0.1 * torch.rand(E, generator=gen)
    return out


def init_expert(config: MoEConfig, seed: int, expert: int) -> ExpertWeights:
    """Weights of global expert ``expert`` (unstacked: gate ``[F, H]`` ...), fp32 on the CPU.

    Depends only on (seed, expert), so a rank builds its own experts without
    materialising anyone else's and the result matches a full single-device init.
    """
    H, Fi = config.hidden_size, config.intermediate_size
    gen = _generator(seed, 1 + expert)
    gate, up, down = _uniform((Fi, H), H, gen), _uniform((Fi, H), H, gen), \
        _uniform((H, Fi), Fi, gen)
    if not config.expert_bias:
        return ExpertWeights(gate, up, down)
    return ExpertWeights(gate, up, down, _uniform((Fi,), H, gen), _uniform((Fi,), H, gen),
                         _uniform((H,), Fi, gen))


def init_shared(config: MoEConfig, seed: int) -> dict[str, Tensor]:
    """The shared expert: ``shared_gate [Fs, H]``, ``shared_up [Fs, H]``, ``shared_down
    [H, Fs]`` and, when configured, ``shared_expert_gate [1, H]``; empty if none."""
    H, Fs = config.hidden_size, config.shared_intermediate_size
    if not Fs:
        return {}
    gen = _generator(seed, 1 + config.num_experts)
    out = {"shared_gate": _uniform((Fs, H), H, gen), "shared_up": _uniform((Fs, H), H, gen),
           "shared_down": _uniform((H, Fs), Fs, gen)}
    if config.shared_expert_gate:
        out["shared_expert_gate"] = _uniform((1, H), H, gen)
    return out


# --------------------------------------------------------------------------- compute


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
    x_NH: Tensor, local_ids_NK: Tensor, weights_NK: Tensor, experts: ExpertWeights, glu: GLU
) -> tuple[Tensor, list[int]]:
    """Each received row's weighted sum over the slots whose expert is local.

    Returns ``(partial_NH, counts)``: ``[N, H]`` in ``x``'s dtype, and the
    number of (row, slot) pairs each local expert computed. One matrix product
    per local expert over a contiguous slice of the sorted rows; no loop over
    tokens. Weighting and the sum over slots run in fp32 (the reference does
    the same), the result is cast back to ``x``'s dtype.
    """
    N, k = local_ids_NK.shape
    pair_M, counts = sort_by_local_expert(local_ids_NK, experts.w_gate.shape[0])
    x_MH = x_NH[pair_M // k]  # copy: rows gathered into expert order
    outs, start = [], 0
    for e, n in enumerate(counts):  # loop over experts, not tokens
        # Empty slices run too: every rank's graph then has the same shape, so
        # every rank joins the same collectives in backward (see all_to_all_v).
        biases = [None if b is None else b[e] for b in experts[3:]]
        outs.append(expert_mlp(x_MH[start : start + n], experts.w_gate[e], experts.w_up[e],
                               experts.w_down[e], glu, *biases))
        start += n
    y_MH = torch.cat(outs)
    weighted_MH = y_MH.float() * weights_NK.flatten()[pair_M].float().unsqueeze(1)
    # Scatter back to (row, slot) positions, then sum the k slots in a fixed order:
    # unique indices and a plain sum keep this deterministic on every device.
    H = x_NH.shape[1]
    slots = weighted_MH.new_zeros((N * k, H)).index_copy(0, pair_M, weighted_MH)
    return slots.view(N, k, H).sum(1).to(x_NH.dtype), counts
