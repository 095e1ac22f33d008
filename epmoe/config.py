"""The MoE layer's configuration: one frozen, validated dataclass.

The fields after ``placement`` describe the routers and experts of real model
families; their defaults give the plain Mixtral-style layer. Each family's
settings, as read from a Hugging Face config, are in ``epmoe.hf.families``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

__all__ = ["MoEConfig", "optional_weight_shapes", "parse_dtype"]

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu", "clamped_swiglu", "custom")
ROUTERS = ("epmoe", "given")
PLACEMENTS = ("linear", "round_robin")
GROUP_SCORINGS = ("top2_sum", "max")
BACKENDS = ("alltoall", "allgather_reducescatter", "low_latency")
EXPERT_IMPLS = ("auto", "loop", "grouped_mm")
DISPATCH_DTYPES = (None, "bfloat16", "float8_e4m3")
NONFINITE = ("raise", "propagate")
PARALLELISMS = ("expert", "tensor")
TP_TOKENS = ("own", "replicated")
DROP_POLICIES = ("probs", "position")  # (epmoe.capacity)

# Names accepted for `dtype`, besides a torch.dtype itself.
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` or a name (``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"``) -> dtype."""
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
    elif isinstance(value, str):
        name = value.removeprefix("torch.").lower()
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(
        f"dtype must be one of torch.float32, torch.bfloat16, torch.float16 "
        f"(or their names {sorted(_DTYPES)}); got {value!r}"
    )


@dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts layer with gated MLP experts.

    Each token's router scores pick ``top_k`` of ``num_experts`` experts; the
    token's output is the weighted sum of their outputs,
    ``down(act(gate(x)) * up(x))`` per expert, plus the shared expert if any.
    """

    hidden_size: int  # H: model dimension of the tokens
    intermediate_size: int  # F: hidden dimension of one expert's MLP
    num_experts: int  # E: routed experts in the layer (global count)
    top_k: int = 2  # k: experts chosen per token
    scoring: str = "softmax"  # router scores: "softmax" over experts, or "sigmoid" per expert
    renormalize: bool = True  # rescale the k chosen weights to sum to 1 (Mixtral: True)
    activation: str = "silu"  # "silu": SwiGLU; "gelu": gated exact GELU; "clamped_swiglu": GPT-OSS;
    #   "custom": the gated product given to the layer (ExpertParallelMoE(glu=...): a model's own)
    dtype: torch.dtype = torch.float32  # weights, tokens and outputs; a name is accepted too
    placement: str = "linear"  # experts to ranks: "linear" (contiguous blocks) or "round_robin"
    parallelism: str = "expert"  # "expert": each rank holds whole experts and tokens travel
    #   to them (EP); "tensor": each rank holds a slice of every expert (gate and up rows,
    #   down columns: F split over the group) and computes every expert (Megatron's TP)
    tp_tokens: str = "own"  # parallelism="tensor": "own": each rank passes its own tokens
    #   (gathered over the group, the partial outputs reduce-scattered back); "replicated":
    #   every rank passes the same tokens, the partial outputs summed by one all-reduce

    # --- routers of the model families ---
    router: str = "epmoe"  # "epmoe": the layer routes its tokens (the fields below); "given":
    #   each forward is given the routing, forward(x, routing=(weights [T, k], ids [T, k])),
    #   from the model's own router (transformers' experts seam, epmoe.hf.seam); the layer
    #   then has no router weight, and the fields below and the balancing losses are unused
    router_bias: bool = False  # logits = x W^T + b (GPT-OSS)
    router_fp32: bool = False  # router weight kept and logits computed in fp32 (DeepSeek)
    score_correction_bias: bool = False  # per-expert bias added to the scores only to choose
    #                                      experts, never to weight them (DeepSeek-V3)
    n_group: int = 1  # group-limited routing: experts form n_group equal groups ...
    topk_group: int = 1  # ... and each token chooses only within its best topk_group groups
    group_scoring: str = "top2_sum"  # a group's score: "top2_sum" of its two best (DeepSeek-V3,
    #                                  others masked to -inf) or its "max" (V2, masked to 0)
    routed_scaling_factor: float = 1.0  # routed experts' weights scaled by this (DeepSeek)

    # --- experts ---
    weigh_in_fp32: bool = False  # weigh expert outputs and sum a row's in fp32, then round
    #   (transformers' Mixtral, DeepSeek); False: in dtype, the weight rounded first (Qwen,
    #   OLMoE, GPT-OSS), which needs no fp32 copy. The same in an fp32 model.
    weigh_input: bool = False  # the routing weight multiplies each expert's input rows instead
    #   of its output, in dtype, and the outputs are summed unweighted (Llama 4; with
    #   weigh_in_fp32 the sum is in fp32)
    expert_bias: bool = False  # biases on every expert's gate, up and down projections (GPT-OSS)
    swiglu_alpha: float = 1.702  # clamped_swiglu: out = (up + 1) * gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # clamped_swiglu: gate <= limit, -limit <= up <= limit

    # --- shared experts: every token, on its own rank ---
    shared_intermediate_size: int = 0  # 0: none; else the shared MLP's F (all shared experts)
    shared_expert_gate: bool = False  # scale the shared output by sigmoid(x w^T), w [1, H]
    overlap_shared: bool = False  # run the shared expert while the dispatch all-to-all travels

    # --- speed: how tokens travel and how experts run ---
    all2all_backend: str = "alltoall"  # "alltoall": exact splits (counts exchanged first);
    #   "allgather_reducescatter": gather the group's tokens, reduce-scatter the results;
    #   "low_latency": fixed buffers of max_tokens_per_rank per rank pair, no host sync
    max_tokens_per_rank: int = 0  # low_latency: most tokens one rank passes in a forward
    expert_impl: str = "auto"  # "loop" (a product per expert), "grouped_mm", or "auto"
    dispatch_dtype: str | None = None  # tokens travel as: None (dtype), "bfloat16", or
    #                                    "float8_e4m3" (with a per-token fp32 scale)
    overlap_microbatches: bool = False  # split the tokens in two: one half dispatches while
    #                                     the other computes

    # --- safety ---
    nonfinite: str = "raise"  # NaN/Inf in a rank's tokens or router scores: "raise" on every
    #   rank (reads one flag per forward), or "propagate": no check; a non-finite token
    #   gives non-finite output rows of its own and leaves every other token exact
    max_chunk_tokens: int = 8192  # a forward of more tokens on some rank runs in chunks of at
    #   most this many tokens per rank (all ranks take the same number of chunks), which
    #   bounds the rows a rank receives, however the tokens route, to G * max_chunk_tokens

    capacity_factor: float = 0.0  # 0: dropless (default). > 0: each rank sends at most
    #   ceil(capacity_factor * T * top_k / num_experts) of its (token, choice) pairs to each
    #   expert (its copies share them) and drops the rest (epmoe.capacity), so an expert
    #   computes at most ep_size times that many rows whatever the routing
    drop_policy: str = "probs"  # with capacity_factor: keep an expert's pairs of the largest
    #   routing weights ("probs", Megatron's default) or the first in token order ("position")

    # --- load balancing (epmoe.eplb, epmoe.rebalance) ---
    load_window: int = 0  # > 0: keep the group-wide tokens per expert of the last this many
    #   forwards (layer.load, for load balancing; one all-reduce of [E] counts per forward)
    num_redundant_experts: int = 0  # extra physical experts: E + this many slots, spread
    #   evenly over the EP ranks (the sum must divide by ep_size when > 0); a replicated
    #   expert's tokens are shared out over its copies, which hold the same weights
    rebalance_interval: int = 0  # > 0: re-place the experts from layer.load every this many
    #   forwards (needs load_window); 0: only when layer.rebalance() is called
    batch_invariant: bool = False  # a token's output has the same bits whatever else is in
    #   the batch, whichever copy serves it, before and after a rebalance (CPU): router,
    #   experts and shared expert run on fixed tiles of ops.INVARIANT_ROWS tokens (zero-
    #   padded, ops.by_tiles), and a token's weighted expert outputs are added in a wider
    #   dtype (partial_dtype) and rounded once. Overrides expert_impl; costs 1.3-3.0x a
    #   forward (benchmarks/batch_invariant.py)

    # --- training: balancing (epmoe.balance) ---
    aux_loss_coef: float = 0.0  # > 0: layer.aux_loss includes this times the Switch/GShard
    #   load-balancing loss over the whole EP group's tokens (one all-reduce of [E] counts)
    z_loss_coef: float = 0.0  # > 0: layer.aux_loss includes this times the router z-loss
    bias_update_rate: float = 0.0  # > 0: layer.update_bias() moves score_correction_bias by
    #   this towards equal load (DeepSeek-V3's auxiliary-loss-free balancing; needs
    #   score_correction_bias=True)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "n_group",
                     "topk_group", "max_chunk_tokens"):
            _check_int(name, getattr(self, name), 1)
        _check_int("shared_intermediate_size", self.shared_intermediate_size, 0,
                   "0: no shared expert")
        _check_int("load_window", self.load_window, 0, "0: no load statistics")
        _check_int("num_redundant_experts", self.num_redundant_experts, 0)
        _check_int("rebalance_interval", self.rebalance_interval, 0, "0: only on demand")
        if self.rebalance_interval and not self.load_window:
            raise ValueError(f"MoEConfig.rebalance_interval={self.rebalance_interval} needs "
                             "load_window > 0: the placement is computed from the load "
                             "statistics of that window")
        _check_int("max_tokens_per_rank", self.max_tokens_per_rank, 0)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} must be <= num_experts={self.num_experts} "
                f"(allowed: 1..{self.num_experts})"
            )
        _check_choice("scoring", self.scoring, SCORINGS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("router", self.router, ROUTERS)
        if self.router == "given":
            used = [n for n in ("router_bias", "score_correction_bias", "aux_loss_coef",
                                "z_loss_coef", "bias_update_rate") if getattr(self, n)]
            if used:
                raise ValueError(f"MoEConfig.router='given' routes with the model's own router: "
                                 f"{used} belong to epmoe's router; unset them")
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("group_scoring", self.group_scoring, GROUP_SCORINGS)
        _check_choice("all2all_backend", self.all2all_backend, BACKENDS)
        _check_choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
        _check_choice("dispatch_dtype", self.dispatch_dtype, DISPATCH_DTYPES)
        _check_choice("nonfinite", self.nonfinite, NONFINITE)
        _check_choice("parallelism", self.parallelism, PARALLELISMS)
        _check_choice("tp_tokens", self.tp_tokens, TP_TOKENS)
        _check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        cf = self.capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, int | float) or not cf >= 0:
            raise ValueError(f"MoEConfig.capacity_factor must be a number >= 0 (0: dropless), "
                             f"got {cf!r}")
        if cf and (self.parallelism == "tensor" or self.batch_invariant):
            raise ValueError("MoEConfig.capacity_factor > 0 drops pairs by what else is in the "
                             "batch: not with batch_invariant=True, nor parallelism='tensor' "
                             "(every expert local); set capacity_factor=0")
        if self.parallelism == "tensor":
            used = [n for n in ("num_redundant_experts", "rebalance_interval", "load_window")
                    if getattr(self, n)]
            if self.all2all_backend == "low_latency":
                used.append("all2all_backend='low_latency'")
            if used:
                raise ValueError(
                    "MoEConfig.parallelism='tensor' holds a slice of every expert on every "
                    "rank: expert placement, load balancing and the low_latency backend do "
                    f"not apply; unset {used}")
        if self.all2all_backend == "low_latency" and self.max_tokens_per_rank < 1:
            raise ValueError("MoEConfig.all2all_backend='low_latency' needs max_tokens_per_rank "
                             ">= 1: its buffers hold that many tokens per rank pair")
        for name in ("renormalize", "router_bias", "router_fp32", "score_correction_bias",
                     "expert_bias", "shared_expert_gate", "overlap_shared",
                     "overlap_microbatches", "weigh_in_fp32", "batch_invariant", "weigh_input"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"MoEConfig.{name} must be a number > 0, got {value!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"MoEConfig.{name} must be a number >= 0 (0: off), got "
                                 f"{value!r}")
        if self.bias_update_rate and not self.score_correction_bias:
            raise ValueError("MoEConfig.bias_update_rate > 0 needs score_correction_bias=True: "
                             "the bias it updates is the one added to the scores to choose")
        self._check_groups()
        if self.shared_expert_gate and not self.shared_intermediate_size:
            raise ValueError("MoEConfig.shared_expert_gate=True needs a shared expert "
                             "(shared_intermediate_size > 0)")
        try:
            dtype = parse_dtype(self.dtype)
        except ValueError as e:
            raise ValueError(f"MoEConfig.{e}") from None
        object.__setattr__(self, "dtype", dtype)  # normalise a name to the torch.dtype

    def _check_groups(self) -> None:
        E, G, g = self.num_experts, self.n_group, self.topk_group
        if E % G:
            divisors = [d for d in range(1, E + 1) if E % d == 0]
            raise ValueError(f"MoEConfig.n_group={G} must divide num_experts={E}; "
                             f"allowed: {divisors}")
        if g > G:
            raise ValueError(f"MoEConfig.topk_group={g} must be <= n_group={G}")
        if G > 1 and self.top_k > g * (E // G):
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} must be <= topk_group * (num_experts // n_group) "
                f"= {g * (E // G)}: the experts of the chosen groups"
            )
        if G > 1 and self.group_scoring == "top2_sum" and E // G < 2:
            raise ValueError(f"MoEConfig.group_scoring='top2_sum' needs >= 2 experts per group, "
                             f"got num_experts // n_group = {E // G}")

    @property
    def router_dtype(self) -> torch.dtype:
        """The dtype of the router weight and logits."""
        return torch.float32 if self.router_fp32 else self.dtype

    @property
    def partial_dtype(self) -> torch.dtype:
        """The dtype of the partial outputs that travel back in combine: the model's, or
        with ``batch_invariant`` a wider one (float64 for a float32 model, else float32)
        in which a token's weighted expert outputs are added and then rounded once, so
        the order of the additions (which follows the placement) does not show."""
        if not self.batch_invariant:
            return self.dtype
        return torch.float64 if self.dtype == torch.float32 else torch.float32

    @property
    def num_physical_experts(self) -> int:
        """P: slots for experts over the EP group, logical experts plus redundant copies."""
        return self.num_experts + self.num_redundant_experts

    def check_ep_size(self, ep_size: int) -> None:
        """Every rank of an EP group holds at least one expert; with redundant experts or
        rebalancing, every rank holds the same number of slots. With tensor parallelism
        (the group is then the TP group) every rank holds a slice of F."""
        if self.parallelism == "tensor":
            if self.intermediate_size < ep_size:
                raise ValueError(f"MoEConfig.intermediate_size={self.intermediate_size} must be "
                                 f">= the {ep_size} ranks of the group with parallelism="
                                 "'tensor': each rank holds a slice of every expert's F")
            return
        if self.num_experts < ep_size:
            raise ValueError(
                f"MoEConfig.num_experts={self.num_experts} must be >= ep_size={ep_size}: "
                f"every EP rank holds at least one expert (use ep_size <= {self.num_experts})"
            )
        P, E = self.num_physical_experts, self.num_experts
        if (self.num_redundant_experts or self.rebalance_interval) and P % ep_size:
            allowed = [r for r in range(0, 2 * ep_size) if (E + r) % ep_size == 0][:2]
            raise ValueError(
                f"MoEConfig: num_experts + num_redundant_experts = {E} + "
                f"{self.num_redundant_experts} = {P} slots do not divide evenly over "
                f"ep_size={ep_size} ranks (needed for redundant experts and rebalancing); "
                f"num_redundant_experts could be {allowed[0]} or {allowed[1]}, plus any "
                f"multiple of {ep_size}")

    def fingerprint(self) -> int:
        """A 63-bit hash of every field, equal on every host and Python process."""
        text = repr([(f.name, str(getattr(self, f.name))) for f in dataclasses.fields(self)])
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1

    def differences(self, other: MoEConfig) -> dict[str, tuple[object, object]]:
        """``{field: (self's value, other's value)}`` of the fields that differ."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name))
                for f in dataclasses.fields(self)
                if str(getattr(self, f.name)) != str(getattr(other, f.name))}

    def replace(self, **changes) -> MoEConfig:
        """A new, validated config with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value: object, minimum: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"MoEConfig.{name} must be {what}{f' ({note})' if note else ''}, "
                         f"got {value!r}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name} must be one of {list(allowed)}, got {value!r}")


def optional_weight_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Full shapes of the weights a config adds to router, w_gate, w_up and w_down."""
    E, H, Fi, Fs = config.num_experts, config.hidden_size, config.intermediate_size, \
        config.shared_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    if config.router_bias:
        shapes["router_bias"] = (E,)
    if config.score_correction_bias:
        shapes["score_correction_bias"] = (E,)
    if config.expert_bias:
        shapes.update(b_gate=(E, Fi), b_up=(E, Fi), b_down=(E, H))
    if Fs:
        shapes.update(shared_gate=(Fs, H), shared_up=(Fs, H), shared_down=(H, Fs))
    if config.shared_expert_gate:
        shapes["shared_expert_gate"] = (1, H)
    return shapes
