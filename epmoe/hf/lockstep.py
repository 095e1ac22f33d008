"""Keep the ranks of an EP group in step when they run different amounts of work.

Every MoE layer is a collective: all ranks of the EP group must run it
together. Ranks that serve different prompts finish at different steps, so,
as vLLM's idle data-parallel ranks do, a rank that is done keeps joining the
MoE collectives with zero tokens until every rank is done.

The protocol is one small all-reduce per model forward (a step): each rank
adds 1 if it runs a real forward now and 0 if it is idle. An idle rank that
sees a non-zero sum runs one dummy step (every MoE layer, in order, on zero
tokens); when the sum is 0 every rank is idle and all stop together.

A rank whose forward fails between MoE layers (a bad token id in the
embedding, say) first runs the rest of that step's MoE layers on zero tokens,
then idles, so its peers finish and only the failing rank reports the error.
A failure inside a collective cannot be recovered: the peers end with a
:class:`~epmoe.errors.RankFailure` naming the failed rank (at once when its
process is gone, at the collective timeout when it stalls).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..health import guarded
from ..moe import ExpertParallelMoE
from ..parallel_state import ParallelState

__all__ = ["Lockstep"]


class Lockstep:
    """The step protocol for one model's MoE layers (see the module docstring)."""

    def __init__(self, state: ParallelState, layers: Sequence[ExpertParallelMoE]) -> None:
        self.state = state
        self.layers = list(layers)  # in the order a forward runs them
        self._depth = 0
        self._done = len(self.layers)  # MoE layers run in the current step
        self._in_collective = False  # inside the step all-reduce or a MoE layer
        self.dummy_steps = 0  # dummy steps this rank ran, over its lifetime
        # The caller agrees on each step itself (the serving engine's per-step gather):
        # then no step all-reduce here, one collective less per forward.
        self.external_agreement = False
        for layer in self.layers:
            layer.register_forward_pre_hook(self._enter_layer)
            layer.register_forward_hook(self._leave_layer)

    @property
    def needed(self) -> bool:
        return self.state.ep_size > 1

    def _enter_layer(self, *_args) -> None:
        self._in_collective = True

    def _leave_layer(self, *_args) -> None:
        self._in_collective = False
        self._done += 1

    def step(self, active: bool) -> int:
        """Join this step's all-reduce; returns how many ranks run a real forward."""
        if not self.needed:
            return int(active)
        flag = torch.tensor([int(active)], dtype=torch.int32, device=self.state.device)
        self._in_collective = True
        s = self.state
        with guarded(s.heartbeat, "the step agreement of the model's forward", s.ep_ranks):
            dist.all_reduce(flag, group=s.ep_group)
        self._in_collective = False
        return int(flag.item())  # NOTE: host sync, once per forward

    def before_forward(self, *_args, **_kwargs) -> None:
        """A forward pre-hook for the model: this rank runs a real step."""
        self._finish_step()  # (a step that failed before its MoE layers, outside a session)
        if not self.external_agreement:
            self.step(True)
        self._done = 0

    def _finish_step(self) -> None:
        """Run, on zero tokens, the MoE layers of the current step that have not run."""
        with torch.no_grad():
            while self._done < len(self.layers):
                self._zero_tokens(self.layers[self._done])

    def _zero_tokens(self, layer: ExpertParallelMoE) -> None:
        c = layer.config
        layer(torch.empty((0, c.hidden_size), dtype=c.dtype, device=self.state.device))

    def zero_step(self) -> None:
        """One dummy step: join the step agreement as idle and run every MoE layer on zero
        tokens (the serving engine's rank with nothing to run in a step the group takes)."""
        if not self.needed:
            return
        self._finish_step()
        if not self.external_agreement:
            self.step(False)
        self._done = 0
        self._finish_step()
        self.dummy_steps += 1

    def idle(self) -> None:
        """Run dummy steps until every rank of the EP group is idle too."""
        if not self.needed:
            return
        self._finish_step()
        with torch.no_grad():
            while self.step(False) > 0:
                self._done = 0
                self._finish_step()
                self.dummy_steps += 1

    def rebalance(self, num_nodes: int = 1, min_gain: float = 0.01) -> list:
        """Re-place the experts of every MoE layer from its own load window
        (:meth:`ExpertParallelMoE.rebalance`); a collective, between forwards, on every
        rank of the EP group. Returns each layer's :class:`~epmoe.rebalance.Rebalance`."""
        return [layer.rebalance(num_nodes=num_nodes, min_gain=min_gain)
                for layer in self.layers]

    def aux_loss(self):
        """The sum of the MoE layers' balancing losses of the last forward (this rank's
        share, see ``epmoe.balance``), or ``None`` when none is configured."""
        parts = [layer.aux_loss for layer in self.layers if layer.aux_loss is not None]
        return sum(parts) if parts else None

    def update_bias(self) -> None:
        """DeepSeek-V3's bias balancing step of every MoE layer (a collective)."""
        for layer in self.layers:
            layer.update_bias()

    @contextmanager
    def session(self) -> Iterator[None]:
        """Real forwards inside; on leaving the outermost session, idle until all are done.

        ``model.generate`` runs in one. Every rank makes the same number of
        outermost sessions (one per ``generate`` call, or one around several
        calls of a rank, so that it idles once, at the end).
        """
        self._depth += 1
        try:
            yield
        except BaseException:
            if self._in_collective:  # failed inside a collective: the peers cannot be met
                self._depth = 0
                raise
            self._depth -= 1
            if self._depth == 0:
                self.idle()  # after a local error too, so that the peers can finish
            raise
        self._depth -= 1
        if self._depth == 0:
            self.idle()
