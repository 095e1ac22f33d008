"""The MoE layer's configuration: one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["MoEConfig", "parse_dtype"]

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu")
PLACEMENTS = ("linear", "round_robin")

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
    ``down(act(gate(x)) * up(x))`` per expert.
    """

    hidden_size: int  # H: model dimension of the tokens
    intermediate_size: int  # F: hidden dimension of one expert's MLP
    num_experts: int  # E: routed experts in the layer (global count)
    top_k: int = 2  # k: experts chosen per token
    scoring: str = "softmax"  # router scores: "softmax" over experts, or "sigmoid" per expert
    renormalize: bool = True  # rescale the k chosen weights to sum to 1 (Mixtral: True)
    activation: str = "silu"  # "silu": SwiGLU experts; "gelu": gated GELU (exact erf GELU)
    dtype: torch.dtype = torch.float32  # weights, tokens and outputs; a name is accepted too
    placement: str = "linear"  # experts to ranks: "linear" (contiguous blocks) or "round_robin"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} must be <= num_experts={self.num_experts} "
                f"(allowed: 1..{self.num_experts})"
            )
        _check_choice("scoring", self.scoring, SCORINGS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("placement", self.placement, PLACEMENTS)
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"MoEConfig.renormalize must be a bool, got {self.renormalize!r}")
        try:
            dtype = parse_dtype(self.dtype)
        except ValueError as e:
            raise ValueError(f"MoEConfig.{e}") from None
        object.__setattr__(self, "dtype", dtype)  # normalise a name to the torch.dtype

    def check_ep_size(self, ep_size: int) -> None:
        """Every rank of an EP group must hold at least one expert."""
        if self.num_experts < ep_size:
            raise ValueError(
                f"MoEConfig.num_experts={self.num_experts} must be >= ep_size={ep_size}: "
                f"every EP rank holds at least one expert (use ep_size <= {self.num_experts})"
            )

    def replace(self, **changes) -> MoEConfig:
        """A new, validated config with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name} must be one of {list(allowed)}, got {value!r}")
