"""``ExpertParallelMoE``: a Mixture-of-Experts layer whose experts are shared out over EP ranks.

Every rank passes its own tokens through the four steps of expert parallelism:

1. router   - replicated gate weight, scores and top-k per token (local);
2. dispatch - each token travels to the ranks holding its experts (``epmoe.dispatch``,
   one of three backends); the shared expert, if any, may run meanwhile;
3. experts  - each rank runs its local experts on what it received (local);
4. combine  - partial outputs travel back and are summed in token order.

Collectives happen only inside dispatch and combine. Shape legend: T = tokens
on this rank, H = hidden size, F = intermediate size, Fs = shared-expert size,
E = experts (global), e = experts on this rank, k = top_k, G = EP ranks,
P = physical expert slots (E plus redundant copies).

Load balancing: with ``num_redundant_experts`` a hot expert has several copies
(slots), and each token's choice of it goes to one copy (``placement.choose_replicas``);
``rebalance()`` re-places the experts from the load statistics, moving only the
rows whose expert changes (``epmoe.rebalance``), between two forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .balance import loss_share_over_group, router_probs, update_bias_over_group, z_loss_share
from .capacity import drop_over_capacity
from .checks import (
    _no_routing,
    check_finite,
    check_full_weights,
    check_input,
    check_routing,
    check_same_config,
)
from .collectives import all_reduce_sum
from .config import MoEConfig, optional_weight_shapes
from .dispatch import make_dispatcher
from .errors import InputError
from .experts import (
    GLU,
    ExpertWeights,
    choose_expert_impl,
    gated_activation,
    grouped_mm_fast,
    grouped_mm_ok,
    init_expert,
    init_router,
    init_shared,
    local_experts_forward,
    local_experts_forward_fixed,
)
from .experts_quant import quantized_experts_forward
from .health import guarded
from .ops import by_tiles, capturing
from .parallel_state import ParallelState
from .placement import ExpertMap, choose_replicas, expert_map, f_slices, tensor_parallel_map
from .quant import QuantizedExperts
from .rebalance import Rebalance, rebalance_layer
from .router import route
from .stats import ExpertLoad, MoEStats, PhaseTimer, forward_stats

__all__ = ["ExpertParallelMoE", "Rebalance", "optional_weight_shapes"]

EXPERT_NAMES = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


class ExpertParallelMoE(nn.Module):
    """MoE layer holding only this rank's experts.

    Parameters: ``router_weight [E, H]`` (replicated), and the stacked local
    experts ``w_gate_up [e, 2F, H]`` (each expert's gate rows, then its up
    rows: one fused product) and ``w_down [e, H, F]``, in the orientation of a
    Hugging Face ``nn.Linear`` weight; ``w_gate`` and ``w_up`` are views of the
    two halves. ``local_experts`` lists their global ids, in stacking order.
    Configs may add ``router_bias [E]``, the buffer ``score_correction_bias
    [E]``, expert biases ``b_gate_up [e, 2F]`` (views ``b_gate``, ``b_up``) and
    ``b_down [e, H]``, and a replicated shared expert ``shared_gate/shared_up
    [Fs, H]``, ``shared_down [H, Fs]``, ``shared_expert_gate [1, H]``.

    ``forward(x [T, H]) -> [T, H]``; T may differ between ranks and may be 0,
    but every rank of the EP group must call forward together.
    ``seed=None`` leaves the weights uninitialised, to be loaded.
    """

    def __init__(
        self,
        config: MoEConfig,
        state: ParallelState,
        *,
        seed: int | None = 0,
        collect_stats: bool = False,
        name: str = "the MoE layer",
        glu: GLU | None = None,
    ) -> None:
        super().__init__()
        config.check_ep_size(state.ep_size)
        self.config = config
        self.state = state
        self.name = name  # how errors name this layer ("layer 3")
        self._where = f"{name} on rank {state.rank}"
        check_same_config(config, state, name)
        self.collect_stats = collect_stats  # fill self.last_stats on every forward
        self.count_tokens = False  # count choices per expert in _load_E (serving's metrics)
        self.last_stats: MoEStats | None = None
        # Token rows put on the wire to each EP rank over all forwards (the entry for
        # self stays local). Free to keep: the split sizes are host ints anyway.
        self.rows_sent: list[int] = [0] * state.ep_size
        self.tensor_parallel = config.parallelism == "tensor"
        if self.tensor_parallel:  # every expert here, columns f_slice of its F
            self.expert_map = tensor_parallel_map(config.num_experts, state.ep_size,
                                                  state.ep_rank)
            self.f_slice = f_slices(config.intermediate_size, state.ep_size)[state.ep_rank]
        else:
            self.expert_map = expert_map(config.num_experts, state.ep_size, config.placement,
                                         config.num_redundant_experts)
            self.f_slice = (0, config.intermediate_size)
        if (config.activation == "custom") != (glu is not None):
            raise ValueError(f"{name}: a glu is given exactly when MoEConfig.activation="
                             f"'custom' (activation={config.activation!r}, glu={glu!r})")
        self._glu = glu if glu is not None else gated_activation(config)

        e = self.expert_map.num_local(state.ep_rank)
        H, Fi = config.hidden_size, self.f_slice[1] - self.f_slice[0]  # (F here)
        dev, dt = state.device, config.dtype
        if config.router == "epmoe":
            self.router_weight = nn.Parameter(torch.empty((config.num_experts, H), device=dev,
                                                          dtype=config.router_dtype))
        else:  # router="given": the model's own router routes (forward's ``routing``)
            self.register_parameter("router_weight", None)
        self.w_gate_up = nn.Parameter(torch.empty((e, 2 * Fi, H), device=dev, dtype=dt))
        self.w_down = nn.Parameter(torch.empty((e, H, Fi), device=dev, dtype=dt))
        if config.expert_bias:
            self.b_gate_up = nn.Parameter(torch.empty((e, 2 * Fi), device=dev, dtype=dt))
            self.b_down = nn.Parameter(torch.empty((e, H), device=dev, dtype=dt))
        for name, shape in optional_weight_shapes(config).items():
            if name in EXPERT_NAMES:
                continue
            if name == "score_correction_bias":  # not trained by the optimiser: a buffer
                self.register_buffer(name, torch.empty(shape, device=dev, dtype=torch.float32))
            else:
                dtype = config.router_dtype if name == "router_bias" else dt
                self.register_parameter(name, nn.Parameter(torch.empty(shape, device=dev,
                                                                       dtype=dtype)))
        # Lookup tables of the placement, [P] each (rank and row of every slot); not
        # weights, so not in state_dict. Updated in place by rebalance().
        # With a capacity, one more slot past the end, no rank's, takes the dropped pairs.
        drop = bool(config.capacity_factor)
        self.register_buffer("owner", self.expert_map.owner_tensor(dev, drop), persistent=False)
        self.register_buffer("local_index", self.expert_map.local_index_tensor(dev, drop),
                             persistent=False)
        self._use_map(self.expert_map)
        self.dispatcher = make_dispatcher(config, state, self.owner, self.local_index)
        self.dispatcher.where = f"the dispatch of {name}"
        # Group-wide tokens per logical expert over the last config.load_window forwards.
        self.load = ExpertLoad(config.num_experts, config.load_window) \
            if config.load_window else None
        self.chunks = 0  # dispatch rounds over all forwards (a forward may take several)
        self.forwards = 0  # forward calls, counted alike on every rank of the group
        self._rebalance_due = False  # set after every rebalance_interval-th forward
        self.last_rebalance: Rebalance | None = None
        # Balancing (epmoe.balance): this rank's share of the losses of the last forward,
        # and the tokens per expert since the last update_bias().
        self._balancing = bool(config.aux_loss_coef or config.z_loss_coef)
        self.aux_loss: Tensor | None = None
        self._bias_counts_E = torch.zeros(config.num_experts, dtype=torch.int64, device=dev)
        self.dropped = torch.zeros((), dtype=torch.int64, device=dev)  # (capacity_factor)
        self.peak_rows = 0  # most rows this rank received in one round (bounded by chunking)
        self.quantized: QuantizedExperts | None = None  # FP8/MXFP4 experts (use_quantized)
        impl = config.expert_impl
        self.expert_impl = choose_expert_impl(dev, dt) if impl == "auto" else impl
        if config.batch_invariant:  # fixed-size products (experts.invariant_experts)
            self.expert_impl = "invariant"
        if seed is not None:
            self.reset_parameters(seed)

    @property
    def local_experts(self) -> tuple[int, ...]:
        """Global ids of the experts in this rank's rows, in stacking order (an expert
        appears twice when two of its copies share this rank)."""
        return self._local_experts

    def _use_map(self, m: ExpertMap) -> None:
        """Switch the lookup tables to placement ``m`` (the weights must already match)."""
        dev = self.owner.device
        self.expert_map = m
        self._local_experts = m.experts_on(self.state.ep_rank)
        P = m.num_slots  # (after them, the slot of dropped pairs, if any)
        self.owner[:P].copy_(m.owner_tensor(dev))  # in place: the dispatcher holds these
        self.local_index[:P].copy_(m.local_index_tensor(dev))
        # Expert ids -> slot ids, unless they are the same (no copies, slot e = expert e).
        self._replicas = None if m.identity else m.replica_tables(dev)

    def _slots(self, ids_TK: Tensor) -> Tensor:
        """The slot each choice goes to ``[T, k]`` (the ids themselves without copies)."""
        if self._replicas is None:
            return ids_TK
        return choose_replicas(ids_TK, *self._replicas, offset=self.state.ep_rank)

    # Views of the fused gate/up tensors, by the names of the full weights.
    w_gate = property(lambda self: self.w_gate_up[:, : self._f])
    w_up = property(lambda self: self.w_gate_up[:, self._f :])
    _f = property(lambda self: self.f_slice[1] - self.f_slice[0])  # (F here)
    b_gate = property(lambda self: self._bias_half(0))
    b_up = property(lambda self: self._bias_half(1))

    def _bias_half(self, half: int) -> Tensor | None:
        b = self.weight("b_gate_up")
        Fi = self._f
        return None if b is None else b[:, half * Fi : (half + 1) * Fi]

    def weight(self, name: str) -> Tensor | None:
        """A parameter, buffer or view by name, ``None`` if this config has none."""
        return getattr(self, name, None)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Initialise from ``seed``, expert by expert equal to ``full_weights(config, seed)``."""
        router = init_router(self.config, seed) if self.config.router == "epmoe" else {}
        for name, t in {**router, **init_shared(self.config, seed)}.items():
            getattr(self, name).copy_(t)
        for i, g in enumerate(self.local_experts):
            for name, t in init_expert(self.config, seed, g).items():
                getattr(self, name)[i].copy_(self._f_part(name, t.unsqueeze(0))[0])

    def _f_part(self, name: str, t_E: Tensor) -> Tensor:
        """This rank's columns of F of a stacked expert weight ``[E, ...]`` (all of it
        without tensor parallelism; ``b_down`` has no F)."""
        a, b = self.f_slice
        if (a, b) == (0, self.config.intermediate_size) or name == "b_down":
            return t_E
        return t_E[:, :, a:b] if name == "w_down" else t_E[:, a:b]

    @torch.no_grad()
    def load_full_weights(self, router_weight: Tensor, w_gate: Tensor, w_up: Tensor,
                          w_down: Tensor, **optional: Tensor) -> None:
        """Take the full ``[E, ...]`` weights and keep the replicated ones and this rank's experts.

        Shapes: ``router_weight [E, H]``, ``w_gate [E, F, H]``, ``w_up [E, F, H]``,
        ``w_down [E, H, F]``, and by keyword the config's optional weights, full
        size (:func:`optional_weight_shapes`). Only this rank's expert slices are
        copied (and cast to the parameter's dtype and device): its experts, or with
        tensor parallelism its columns of every expert's F.
        """
        c = self.config
        E, H, Fi = c.num_experts, c.hidden_size, c.intermediate_size
        want = {"router_weight": (E, H), "w_gate": (E, Fi, H), "w_up": (E, Fi, H),
                "w_down": (E, H, Fi), **optional_weight_shapes(c)}
        given = {"router_weight": router_weight, "w_gate": w_gate, "w_up": w_up,
                 "w_down": w_down, **optional}
        if c.router == "given":  # no router weight here: the model routes
            if router_weight is not None:
                raise ValueError(f"{self.name} has no router (MoEConfig.router='given'): "
                                 "pass router_weight=None")
            del want["router_weight"], given["router_weight"]
        check_full_weights(given, want, {n: getattr(self, n).dtype for n in want}, c)
        for name, t in given.items():
            if name in EXPERT_NAMES:
                t = self._f_part(name, t.index_select(
                    0, torch.tensor(self.local_experts, device=t.device)))
            getattr(self, name).copy_(t)

    def rebalance(self, load_E: Tensor | None = None, num_nodes: int = 1,
                  min_gain: float = 0.01) -> Rebalance:
        """Re-place the experts (``epmoe.eplb.rebalance_experts``) for the tokens per expert
        ``load_E [E]`` (default: ``self.load``'s window), moving only the rows whose expert
        changes, and nothing unless the balancedness (mean / max tokens per rank) rises by
        ``min_gain``. ``num_nodes``: hosts in the EP group (DeepSeek's hierarchical policy
        keeps an expert group on one). A collective: every rank of the EP group calls it,
        between forwards, with the same load. Outputs do not change (the copies hold the
        same weights; bitwise with ``batch_invariant``). Returns what it did on this rank
        (also ``self.last_rebalance``)."""
        self.last_rebalance = rebalance_layer(self, load_E, num_nodes, min_gain)
        return self.last_rebalance

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """DeepSeek-V3's auxiliary-loss-free balancing: move ``score_correction_bias`` by
        ``config.bias_update_rate`` towards equal load, from the group's tokens per expert
        since the last call (returned, ``[E]``). A collective: every rank of the EP group
        calls it, typically after each optimiser step."""
        c = self.config
        if not c.bias_update_rate:
            raise ValueError(f"update_bias of {self.name}: set MoEConfig.bias_update_rate > 0 "
                             "(and score_correction_bias=True)")
        counts_E = update_bias_over_group(self.score_correction_bias, self._bias_counts_E, c,
                                          self.state, f"the bias update of {self.name}")
        self._bias_counts_E.zero_()
        return counts_E

    def expert_tensors(self) -> list[Tensor]:
        """The stacked per-slot tensors ``[e, ...]``: what a rebalance moves (with quantized
        experts, their stored blocks and scales)."""
        names = ("w_gate_up", "w_down", "b_gate_up", "b_down")
        plain = [t for n in names if (t := self.weight(n)) is not None]
        return plain + (list(self.quantized.buffers()) if self.quantized is not None else [])

    def use_quantized(self, experts: QuantizedExperts) -> None:
        """Hold this rank's experts quantized (FP8 or MXFP4, :mod:`epmoe.quant`), one expert
        dequantized at a time when it computes, in place of the plain ``w_gate_up`` and
        ``w_down`` (dropped: about half or a quarter of their bytes stay). Inference and
        rebalancing only: the quantized weights have no gradients, and the reference and
        ``load_full_weights`` need the plain ones."""
        c = self.config
        if c.weigh_input or c.parallelism == "tensor":
            raise ValueError(f"{self.name}: quantized experts do not run with "
                             f"weigh_input=True or parallelism='tensor'")
        if experts.num_local != len(self.local_experts) or \
                (experts.hidden, experts.inter) != (c.hidden_size, c.intermediate_size):
            raise ValueError(f"{self.name}: quantized experts of e={experts.num_local}, "
                             f"H={experts.hidden}, F={experts.inter}; this layer has "
                             f"e={len(self.local_experts)}, H={c.hidden_size}, "
                             f"F={c.intermediate_size}")
        del self.w_gate_up, self.w_down
        self.register_parameter("w_gate_up", None)
        self.register_parameter("w_down", None)
        self.quantized = experts

    def expert_weight_bytes(self) -> int:
        """Bytes of routed-expert weights this rank holds (replicated weights not counted)."""
        return sum(t.numel() * t.element_size() for t in self.expert_tensors())

    def _experts(self) -> ExpertWeights:
        b_down = self.weight("b_down")
        if self.tensor_parallel and self.state.ep_rank:  # the group's sum adds it once
            b_down = None
        return ExpertWeights(self.w_gate_up, self.w_down, self.weight("b_gate_up"), b_down)

    def _shared(self, x_TH: Tensor) -> Tensor:
        if self.config.batch_invariant:  # in fixed tiles of tokens (ops.by_tiles)
            return by_tiles(self._shared_mlp, x_TH)
        return self._shared_mlp(x_TH)

    def _shared_mlp(self, x_TH: Tensor) -> Tensor:
        g, u = F.linear(x_TH, self.shared_gate), F.linear(x_TH, self.shared_up)
        y_TH = F.linear(self._glu(g, u), self.shared_down)
        if self.config.shared_expert_gate:  # Qwen2-MoE: a sigmoid gate per token
            y_TH = torch.sigmoid(F.linear(x_TH, self.shared_expert_gate)) * y_TH
        return y_TH

    def forward(self, x_TH: Tensor, routing: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x [T, H] -> y [T, H]``, in chunks of at most ``config.max_chunk_tokens``
        tokens per rank; every rank of the EP group takes the same number of chunks
        (each dispatch tells the others whether a rank has tokens left). Bad input on
        any rank raises on every rank, at the first dispatch (:mod:`epmoe.errors`).

        ``routing``: with ``config.router == "given"`` (only then), the model's own routing
        of these tokens, ``(weights [T, k], expert ids [T, k])``; ``None`` for T = 0."""
        c = self.config
        if self._rebalance_due:  # between two forwards (after the last one's backward)
            self._rebalance_due = False
            self.rebalance()
        error = check_input(x_TH, c, self.state.device, self._where)
        if error is None:
            routing, error = check_routing(routing, x_TH, c, self._where)
        if error is not None:  # join the group's first dispatch with no tokens, then raise
            x_TH = torch.empty((0, c.hidden_size), dtype=c.dtype, device=self.state.device)
            routing = None if c.router == "epmoe" else _no_routing(c, x_TH.device)
        T = x_TH.shape[0]
        # low_latency: one round (its limit is max_tokens_per_rank); else chunks.
        step = max(T, 1) if c.all2all_backend == "low_latency" else c.max_chunk_tokens
        outs, start = [], 0
        counting = (self.load is not None or self._balancing or c.bias_update_rate
                    or self.count_tokens)
        self._load_E = torch.zeros(c.num_experts, dtype=torch.int64, device=x_TH.device) \
            if counting else None
        self._probs_E = self._z = None  # (sums over this rank's tokens, with gradients)
        # (token, choice) pairs this rank dropped in this forward (capacity_factor > 0)
        self.dropped = torch.zeros((), dtype=torch.int64, device=x_TH.device)
        with self._guard("forward"):  # (names where this rank is, between the phases)
            while True:  # until no rank has tokens left
                end = min(start + step, T)
                part = None if routing is None else (routing[0][start:end],
                                                       routing[1][start:end])
                y_TH, more_anywhere = self._chunk(x_TH[start:end], error, end < T, part)
                outs.append(y_TH)
                start = end
                if not more_anywhere:
                    break
        if self.load is not None:
            s = self.state
            with self._guard("load statistics"):
                self.load.add(all_reduce_sum(self._load_E, s.ep_group))
        if c.bias_update_rate:
            self._bias_counts_E += self._load_E
        if self._balancing:
            self.aux_loss = loss_share_over_group(self._probs_E, self._z, self._load_E, T, c,
                                                  self.state, f"the balancing losses of "
                                                  f"{self.name}")
        self.forwards += 1
        if c.rebalance_interval and self.forwards % c.rebalance_interval == 0:
            self._rebalance_due = True  # at the start of the next forward
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _chunk(self, x_TH: Tensor, error: InputError | None, more: bool,
               routing: tuple[Tensor, Tensor] | None) -> tuple[Tensor, bool]:
        c, s = self.config, self.state
        self.chunks += 1
        timer = PhaseTimer(self.collect_stats, s.device)
        timer.start()
        if routing is None:
            weights_TK, ids_TK, logits_TE = route(
                x_TH, self.router_weight, c, self.weight("router_bias"),
                self.weight("score_correction_bias"), return_logits=True)
        else:  # the model's own router's choices (router="given"): no logits here
            (weights_TK, ids_TK), logits_TE = routing, None
        if error is None and c.nonfinite == "raise" and not capturing():  # (no host reads
            error = check_finite(x_TH, logits_TE, weights_TK, self._where)  # in a CUDA graph)
        if self._load_E is not None:
            # (index_add_, not bincount: on CUDA bincount reads the ids' min and max on
            # the host, which a CUDA graph does not allow; integer sums are exact)
            ids = ids_TK.flatten()
            self._load_E.index_add_(0, ids, torch.ones_like(ids, dtype=self._load_E.dtype))
        if self._balancing:  # sums over this rank's tokens, for the losses after the chunks
            probs_E = router_probs(logits_TE, c.scoring).sum(0)
            self._probs_E = probs_E if self._probs_E is None else self._probs_E + probs_E
            if c.z_loss_coef:
                z = z_loss_share(logits_TE, 1)  # sum of logsumexp^2
                self._z = z if self._z is None else self._z + z
        slots_TK = self._slots(ids_TK)  # the dispatch sees slot ids from here on
        if c.capacity_factor:  # drop the pairs over an expert's capacity (epmoe.capacity)
            weights_TK, slots_TK, dropped = drop_over_capacity(weights_TK, ids_TK, slots_TK, c)
            self.dropped += dropped
        timer.lap("router")
        if c.overlap_microbatches and not self.collect_stats:
            y_TH, more = self._two_microbatches(x_TH, weights_TK, slots_TK, error, more)
        else:
            y_TH, more = self._one_batch(x_TH, weights_TK, slots_TK, timer, error, more)
        if self.collect_stats:
            wire, counts, local_ids_NK = self._last
            self.last_stats = forward_stats(ids_TK, slots_TK, self.owner, c.num_experts,
                                            s.ep_size, len(self.local_experts), wire, counts,
                                            local_ids_NK, timer.seconds)
        return y_TH, more

    def _guard(self, phase: str):
        s = self.state
        return guarded(s.heartbeat, f"the {phase} of {self.name}", s.ep_ranks)

    def _one_batch(self, x_TH: Tensor, weights_TK: Tensor, slots_TK: Tensor,
                   timer: PhaseTimer, error: InputError | None,
                   more: bool) -> tuple[Tensor, bool]:
        c = self.config
        has_shared = c.shared_intermediate_size > 0
        with self._guard("dispatch"):
            pending = self.dispatcher.start(x_TH, weights_TK, slots_TK, error, more)
            shared_TH = self._shared(x_TH) if has_shared and c.overlap_shared else None
            received, handle = pending.wait()
        timer.lap("dispatch")  # with overlap_shared, includes the shared expert
        with self._guard("experts"):  # (no collective: names where this rank is)
            partial_NH, counts = self._compute(received)
        timer.lap("experts")
        self._count(handle, counts, received)
        with self._guard("combine"):
            y_TH = self.dispatcher.combine_start(partial_NH, handle).wait().to(c.dtype)
        timer.lap("combine")
        if has_shared:
            y_TH = y_TH + (shared_TH if shared_TH is not None else self._shared(x_TH))
            timer.lap("shared")  # ~0 when overlapped: only the addition
        return y_TH, pending.more

    def _two_microbatches(self, x_TH: Tensor, weights_TK: Tensor, slots_TK: Tensor,
                          error: InputError | None,
                          more: bool) -> tuple[Tensor, bool]:
        """Halves A and B: B's dispatch travels while A computes, A's combine while B
        computes. Every rank splits (even with 0 or 1 tokens), so collectives pair up."""
        c = self.config
        half = (x_TH.shape[0] + 1) // 2
        parts = [(x_TH[:half], weights_TK[:half], slots_TK[:half]),
                 (x_TH[half:], weights_TK[half:], slots_TK[half:])]
        with self._guard("dispatch"):
            sent = [self.dispatcher.start(*p, error, more) for p in parts]
        combining = []
        for pending in sent:
            with self._guard("dispatch"):
                received, handle = pending.wait()
            partial_NH, counts = self._compute(received)
            with self._guard("combine"):
                combining.append(self.dispatcher.combine_start(partial_NH, handle))
            self._count(handle, counts, received)
        shared_TH = self._shared(x_TH) if c.shared_intermediate_size else None
        with self._guard("combine"):
            y_TH = torch.cat([p.wait() for p in combining]).to(c.dtype)
        return (y_TH if shared_TH is None else y_TH + shared_TH), sent[0].more

    def _compute(self, received) -> tuple[Tensor, list[int] | None]:
        x_NH, local_ids_NK, w_NK = received
        c = self.config
        if self.quantized is not None:  # FP8 / MXFP4: one expert dequantized at a time
            b_gu, b_d = self.weight("b_gate_up"), self._experts().b_down
            wide = c.partial_dtype if c.partial_dtype != c.dtype else None
            return quantized_experts_forward(
                x_NH, local_ids_NK, w_NK, self.quantized, self._glu, c.weigh_in_fp32, wide,
                None if b_gu is None else (b_gu, b_d), c.batch_invariant, self.expert_impl)
        # Fixed shapes (no host sync: CUDA-graph safe) where a host sync costs
        # something; on the CPU reading the counts is free, and the fixed path's
        # gather of every padding slot is not.
        # (Only where grouped_mm's fused kernel runs: its fallback reads the offsets on
        # the host anyway, and would add the gather of every padding slot.)
        if self.dispatcher.fixed_shapes and grouped_mm_fast(x_NH.device, x_NH.dtype) and \
                not self.config.batch_invariant and grouped_mm_ok(self._experts()):
            return local_experts_forward_fixed(x_NH, local_ids_NK, w_NK, self._experts(),
                                               self._glu, self.config.weigh_in_fp32,
                                               self.config.weigh_input), None
        wide = c.partial_dtype if c.partial_dtype != c.dtype else None
        return local_experts_forward(x_NH, local_ids_NK, w_NK, self._experts(), self._glu,
                                     self.expert_impl, c.weigh_in_fp32, wide, c.weigh_input)

    def _count(self, handle, counts: list[int] | None, received) -> None:
        wire = self.dispatcher.wire(handle)
        self.peak_rows = max(self.peak_rows, received.x_NH.shape[0])
        self.rows_sent = [a + b for a, b in zip(self.rows_sent, wire.send_rows, strict=True)]
        if self.collect_stats:
            self._last = (wire, counts, received.local_ids_NK)

    def extra_repr(self) -> str:
        c = self.config
        return (f"E={c.num_experts}, local={list(self.local_experts)}, H={c.hidden_size}, "
                f"F={c.intermediate_size}, top_k={c.top_k}, ep={self.state.ep_rank}/"
                f"{self.state.ep_size}, backend={c.all2all_backend}, "
                f"experts={self.expert_impl}, dtype={c.dtype}")
