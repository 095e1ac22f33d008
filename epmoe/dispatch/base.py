"""What every dispatch backend provides, and the pieces they share.

A backend moves each rank's tokens to the ranks of their experts (``start``,
then ``wait``: the rows this rank received, each with the local ids and
weights of its k slots) and the experts' partial outputs back (``combine``).
Collectives happen only here, never in the router or the experts.

The first collective of every dispatch also carries a small header per rank:
its input :class:`~epmoe.errors.Problem` code (a rank with bad input joins with
no tokens) and whether it has tokens left for another chunk. Every rank reads
every header there, so a problem on one rank raises on all of them at the same
point, and all ranks agree on how many chunks a forward takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import MoEConfig
from ..errors import InputError, PeerInputError, Problem
from ..parallel_state import ParallelState
from .quant import Codec, make_codec

__all__ = ["Deferred", "Dispatcher", "Received", "Wire", "header_of", "settle"]

META_BYTES = 8  # per slot and row: an fp32 weight and an fp32 local expert id


class Received(NamedTuple):
    """The rows a rank received: ``x_NH``, and per slot the local expert id (-1 if the
    slot's expert lives elsewhere, or the row is padding) and the fp32 weight."""

    x_NH: Tensor
    local_ids_NK: Tensor
    weights_NK: Tensor


@dataclass(frozen=True)
class Wire:
    """Rows and bytes one forward put on the wire, per peer rank (host ints, free)."""

    send_rows: list[int]  # [G] token rows sent to each rank (the entry for self stays local)
    recv_rows: list[int]  # [G] token rows received from each rank
    dispatch_bytes: list[int]  # [G] bytes sent to each rank in dispatch
    combine_bytes: list[int]  # [G] bytes sent to each rank in combine


def header_of(error: InputError | None, more: bool) -> list[int]:
    """This rank's header: ``[problem, detail, more]``."""
    if error is None:
        return [int(Problem.OK), 0, int(more)]
    return [int(error.problem), int(error.detail), 0]


def settle(headers: list[list[int]], error: InputError | None, ranks: tuple[int, ...],
           where: str) -> bool:
    """After the header exchange: raise on every rank if any rank has a problem (this
    rank's own error on itself, :class:`PeerInputError` elsewhere); else return
    whether any rank has tokens for another chunk. ``headers[j]`` is EP rank j's."""
    if error is not None:
        raise error
    for j, (problem, detail, _more) in enumerate(headers):
        if problem:
            raise PeerInputError(ranks[j], Problem(problem), detail, where)
    return any(more for _p, _d, more in headers)


class Deferred:
    """A result that ``wait()`` computes once, when it is needed. ``more``: after a
    dispatch, whether any rank of the group has tokens for another chunk."""

    def __init__(self, fn: Callable[[], Any], more: bool = False) -> None:
        self._fn, self._done, self._value = fn, False, None
        self.more = more

    def wait(self) -> Any:
        if not self._done:
            self._value, self._done, self._fn = self._fn(), True, None
        return self._value


class Dispatcher:
    """Base of the backends. ``fixed_shapes``: no host sync anywhere, the received
    rows have a fixed count (the experts then run without one too)."""

    name = "base"
    fixed_shapes = False

    def __init__(self, config: MoEConfig, state: ParallelState, owner_E: Tensor,
                 local_index_E: Tensor) -> None:
        self.config, self.state = config, state
        self.owner_E, self.local_index_E = owner_E, local_index_E
        self.group, self.G, self.me = state.ep_group, state.ep_size, state.ep_rank
        # Tokens encoded for the wire only where they travel (not within a group of one).
        self.codec: Codec | None = make_codec(config.dispatch_dtype, config.dtype) \
            if self.G > 1 else None
        self.where = "the dispatch"  # how errors name this dispatch (the layer sets it)

    def token_bytes(self, H: int) -> int:
        """Bytes one token row takes on the wire in dispatch."""
        if self.codec is not None:
            return self.codec.row_bytes(H)
        return H * torch.empty((), dtype=self.config.dtype).element_size()

    def partial_bytes(self, H: int) -> int:
        """Bytes one partial-output row takes on the wire in combine."""
        return H * torch.empty((), dtype=self.config.partial_dtype).element_size()

    def start(self, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor,
              error: InputError | None = None, more: bool = False) -> Deferred:
        """Send; ``wait()`` returns ``(Received, handle)``. ``error``: this rank's input
        problem (it then passes no tokens); ``more``: it has tokens for another chunk.
        Raises on every rank, after the first exchange, if any rank has a problem."""
        raise NotImplementedError

    def combine_start(self, partial_NH: Tensor, handle) -> Deferred:
        """Send the received rows' partial outputs back; ``wait()`` returns ``y_TH``."""
        raise NotImplementedError

    def wire(self, handle) -> Wire:
        raise NotImplementedError
