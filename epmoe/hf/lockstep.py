"""Keep the ranks of an EP group in step when they run different amounts of work.

Every MoE layer is a collective: all ranks of the EP group must run it
together. Ranks that serve different prompts finish at different steps, so,
as vLLM's idle data-parallel ranks do, a rank that is done keeps joining the
MoE collectives with zero tokens until every rank is done.

The protocol is one small all-reduce per model forward (a step): each rank
adds 1 if it runs a real forward now and 0 if it is idle. An idle rank that
sees a non-zero sum runs one dummy step (every MoE layer, in order, on zero
tokens); when the sum is 0 every rank is idle and all stop together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..moe import ExpertParallelMoE
from ..parallel_state import ParallelState

__all__ = ["Lockstep"]


class Lockstep:
    """The step protocol for one model's MoE layers (see the module docstring)."""

    def __init__(self, state: ParallelState, layers: Sequence[ExpertParallelMoE]) -> None:
        self.state = state
        self.layers = list(layers)  # in the order a forward runs them
        self._depth = 0
        self.dummy_steps = 0  # dummy steps this rank ran, over its lifetime

    @property
    def needed(self) -> bool:
        return self.state.ep_size > 1

    def step(self, active: bool) -> int:
        """Join this step's all-reduce; returns how many ranks run a real forward."""
        if not self.needed:
            return int(active)
        flag = torch.tensor([int(active)], dtype=torch.int32, device=self.state.device)
        dist.all_reduce(flag, group=self.state.ep_group)
        return int(flag.item())  # NOTE: host sync, once per forward

    def before_forward(self, *_args, **_kwargs) -> None:
        """A forward pre-hook for the model: this rank runs a real step."""
        self.step(True)

    def idle(self) -> None:
        """Run dummy steps until every rank of the EP group is idle too."""
        if not self.needed:
            return
        with torch.no_grad():
            while self.step(False) > 0:
                for layer in self.layers:
                    h = layer.config.hidden_size
                    layer(torch.empty((0, h), dtype=layer.config.dtype, device=self.state.device))
                self.dummy_steps += 1

    @contextmanager
    def session(self) -> Iterator[None]:
        """Real forwards inside; on leaving the outermost session, idle until all are done.

        ``model.generate`` runs in one. Wrap several calls (or plain forwards)
        of a rank in one session so that the rank idles once, at the end.
        """
        self._depth += 1
        peers_gone = False
        try:
            yield
        except RuntimeError:  # what a failed collective raises: the peers may be gone
            peers_gone = True
            raise
        finally:
            self._depth -= 1
            if self._depth == 0 and not peers_gone:
                self.idle()  # also after a local error (bad input), so the peers can finish
