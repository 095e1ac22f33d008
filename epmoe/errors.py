"""The errors epmoe raises when something is wrong on one rank, on every rank.

A collective needs every rank of its group. When one rank's input is bad, that
rank must not simply raise: its peers would wait for it in the next collective
until the timeout. Instead the bad rank joins the first collective of the
dispatch with an :class:`Problem` code in its header (and no tokens), every
rank reads every rank's code there, and all of them raise at the same point:
the bad rank its own :class:`InputError`, with the full text, the others a
:class:`PeerInputError` naming the bad rank and its problem.

When a rank dies, stalls, or becomes unreachable, the others cannot learn it
from the collective itself (gloo reports a closed socket or a timeout); they
raise :class:`RankFailure` with the diagnosis of :mod:`epmoe.health`.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["InputError", "PeerInputError", "Problem", "RankFailure"]


class Problem(IntEnum):
    """What was wrong with a rank's input, as it travels in a dispatch header."""

    OK = 0
    SHAPE = 1  # x is not [T, hidden_size]
    DTYPE = 2  # x is not config.dtype
    DEVICE = 3  # x is not on the rank's device
    NONFINITE_INPUT = 4  # NaN or Inf in x (config.nonfinite="raise")
    NONFINITE_SCORES = 5  # NaN or Inf in the router scores of finite tokens
    TOO_MANY_TOKENS = 6  # more than config.max_tokens_per_rank (low_latency)
    ROUTING = 7  # the given routing (router="given") is missing or misshaped

    def describe(self, detail: int) -> str:
        """Short words for the peers; ``detail`` is a count the code carries."""
        return {
            Problem.SHAPE: "its input x is not of shape [T, hidden_size]",
            Problem.ROUTING: "its routing (weights, ids) is missing or not [T, top_k]",
            Problem.DTYPE: "its input x is not of config.dtype",
            Problem.DEVICE: "its input x is not on its device",
            Problem.NONFINITE_INPUT: f"its input x has NaN or Inf in {detail} token(s)",
            Problem.NONFINITE_SCORES: f"its router scores have NaN or Inf in {detail} token(s) "
                                      "though the tokens are finite (router weights?)",
            Problem.TOO_MANY_TOKENS: f"it passed {detail} tokens, more than "
                                     "config.max_tokens_per_rank",
        }.get(self, "unknown problem")


class InputError(ValueError):
    """This rank's input is bad; raised on this rank after its peers were told."""

    def __init__(self, problem: Problem, detail: int, message: str) -> None:
        super().__init__(message)
        self.problem, self.detail = problem, detail


class PeerInputError(ValueError):
    """Another rank of the EP group had bad input; this rank's was fine."""

    def __init__(self, rank: int, problem: Problem, detail: int, where: str) -> None:
        super().__init__(f"EP rank {rank} could not run {where}: {problem.describe(detail)}; "
                         f"its own error says more. This rank's input was fine, and every "
                         "rank of the EP group stopped at the same point.")
        self.rank, self.problem, self.detail = rank, problem, detail


class RankFailure(RuntimeError):
    """A peer rank died, stalled, or became unreachable during a collective."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks  # the global ranks found failed (may be empty if none was found)
