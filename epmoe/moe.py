"""``ExpertParallelMoE``: a Mixture-of-Experts layer whose experts are shared out over EP ranks.

Every rank passes its own tokens through the four steps of expert parallelism:

1. router   - replicated gate weight, scores and top-k per token (local);
2. dispatch - each token travels once to every rank holding one of its experts;
3. experts  - each rank runs its local experts on what it received (local);
4. combine  - partial outputs travel back and are summed in token order.

Collectives happen only inside ``dispatch`` and ``combine`` (``epmoe.dispatch``).
Shape legend: T = tokens on this rank, H = hidden size, F = intermediate size,
E = experts (global), e = experts on this rank, k = top_k, G = EP ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch import combine, dispatch
from .experts import init_expert, init_router, local_experts_forward
from .parallel_state import ParallelState
from .placement import expert_map
from .router import route
from .stats import MoEStats, PhaseTimer

__all__ = ["ExpertParallelMoE"]


class ExpertParallelMoE(nn.Module):
    """MoE layer holding only this rank's experts.

    Parameters: ``router_weight [E, H]`` (replicated), and the stacked local
    experts ``w_gate [e, F, H]``, ``w_up [e, F, H]``, ``w_down [e, H, F]`` in
    the orientation of a Hugging Face ``nn.Linear`` weight. ``local_experts``
    lists their global ids, in that stacking order.

    ``forward(x [T, H]) -> [T, H]``; T may differ between ranks and may be 0,
    but every rank of the EP group must call forward together.
    """

    def __init__(
        self,
        config: MoEConfig,
        state: ParallelState,
        *,
        seed: int = 0,
        collect_stats: bool = False,
    ) -> None:
        super().__init__()
        config.check_ep_size(state.ep_size)
        self.config = config
        self.state = state
        self.collect_stats = collect_stats  # fill self.last_stats on every forward
        self.last_stats: MoEStats | None = None
        # Token rows sent to each EP rank over all forwards (the entry for self stays
        # local). Free to keep: the split sizes are on the host for the all-to-all anyway.
        self.rows_sent: list[int] = [0] * state.ep_size
        self.expert_map = expert_map(config.num_experts, state.ep_size, config.placement)
        self.local_experts: tuple[int, ...] = self.expert_map.experts_on(state.ep_rank)

        E, e = config.num_experts, len(self.local_experts)
        H, Fi = config.hidden_size, config.intermediate_size
        kw = {"device": state.device, "dtype": config.dtype}
        self.router_weight = nn.Parameter(torch.empty((E, H), **kw))
        self.w_gate = nn.Parameter(torch.empty((e, Fi, H), **kw))
        self.w_up = nn.Parameter(torch.empty((e, Fi, H), **kw))
        self.w_down = nn.Parameter(torch.empty((e, H, Fi), **kw))
        # Lookup tables of the placement, [E] each; not weights, so not in state_dict.
        self.register_buffer("owner", self.expert_map.owner_tensor(state.device), persistent=False)
        self.register_buffer(
            "local_index", self.expert_map.local_index_tensor(state.device), persistent=False
        )
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Initialise from ``seed``, expert by expert equal to ``full_weights(config, seed)``."""
        self.router_weight.copy_(init_router(self.config, seed))
        for i, g in enumerate(self.local_experts):
            gate, up, down = init_expert(self.config, seed, g)
            self.w_gate[i].copy_(gate)
            self.w_up[i].copy_(up)
            self.w_down[i].copy_(down)

    @torch.no_grad()
    def load_full_weights(
        self, router_weight: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor
    ) -> None:
        """Take the full ``[E, ...]`` weights and keep the router and this rank's experts.

        Shapes: ``router_weight [E, H]``, ``w_gate [E, F, H]``, ``w_up [E, F, H]``,
        ``w_down [E, H, F]``. Only this rank's slices are copied (and cast to
        the config's dtype and the rank's device).
        """
        c = self.config
        E, H, Fi = c.num_experts, c.hidden_size, c.intermediate_size
        want = {"router_weight": (E, H), "w_gate": (E, Fi, H), "w_up": (E, Fi, H),
                "w_down": (E, H, Fi)}
        given = {"router_weight": router_weight, "w_gate": w_gate, "w_up": w_up, "w_down": w_down}
        for name, t in given.items():
            if tuple(t.shape) != want[name]:
                raise ValueError(f"load_full_weights: {name} has shape {tuple(t.shape)}, "
                                 f"expected {want[name]} for {c}")
        self.router_weight.copy_(router_weight)
        local = torch.tensor(self.local_experts, device=w_gate.device)
        self.w_gate.copy_(w_gate.index_select(0, local))
        self.w_up.copy_(w_up.index_select(0, local))
        self.w_down.copy_(w_down.index_select(0, local))

    def expert_weight_bytes(self) -> int:
        """Bytes of expert weights this rank holds (the router is replicated, not counted)."""
        return sum(p.numel() * p.element_size() for p in (self.w_gate, self.w_up, self.w_down))

    def forward(self, x_TH: Tensor) -> Tensor:
        self._check_input(x_TH)
        c, s = self.config, self.state
        timer = PhaseTimer(self.collect_stats, s.device)
        timer.start()

        weights_TK, ids_TK = route(x_TH, self.router_weight, c)
        timer.lap("router")

        x_NH, local_ids_NK, w_NK, handle = dispatch(
            x_TH, weights_TK, ids_TK, self.owner, self.local_index, s.ep_group, s.ep_size
        )
        timer.lap("dispatch")

        partial_NH, counts = local_experts_forward(
            x_NH, local_ids_NK, w_NK, self.w_gate, self.w_up, self.w_down, c.activation
        )
        timer.lap("experts")

        y_TH = combine(partial_NH, handle)
        timer.lap("combine")

        self.rows_sent = [a + b for a, b in zip(self.rows_sent, handle.send_splits, strict=True)]

        if self.collect_stats:
            self.last_stats = self._stats(x_TH, ids_TK, handle, counts, timer.seconds)
        return y_TH

    def _check_input(self, x: Tensor) -> None:
        c = self.config
        if x.dim() != 2 or x.shape[1] != c.hidden_size:
            raise ValueError(f"ExpertParallelMoE expects x of shape [T, {c.hidden_size}] "
                             f"(tokens, hidden_size), got {tuple(x.shape)}")
        if x.dtype != c.dtype:
            raise ValueError(f"ExpertParallelMoE expects x of dtype {c.dtype} (config.dtype), "
                             f"got {x.dtype}")
        if x.device != self.router_weight.device:
            raise ValueError(f"ExpertParallelMoE expects x on {self.router_weight.device} "
                             f"(this rank's device), got {x.device}")

    def _stats(self, x_TH, ids_TK, handle, counts, seconds) -> MoEStats:
        # Only when collect_stats is on: one bincount and its host sync.
        row = x_TH.shape[1] * x_TH.element_size()
        meta = 2 * self.config.top_k * 4  # fp32 weights and ids per row
        per_expert = torch.bincount(ids_TK.flatten(), minlength=self.config.num_experts)
        return MoEStats(
            tokens=x_TH.shape[0],
            tokens_per_expert=per_expert.tolist(),
            recv_per_local_expert=list(counts),
            send_rows=list(handle.send_splits),
            recv_rows=list(handle.recv_splits),
            dispatch_bytes=[n * (row + meta) for n in handle.send_splits],
            combine_bytes=[n * row for n in handle.recv_splits],
            seconds=dict(seconds),
        )

    def extra_repr(self) -> str:
        c = self.config
        return (f"E={c.num_experts}, local={list(self.local_experts)}, H={c.hidden_size}, "
                f"F={c.intermediate_size}, top_k={c.top_k}, ep={self.state.ep_rank}/"
                f"{self.state.ep_size}, dtype={c.dtype}")
