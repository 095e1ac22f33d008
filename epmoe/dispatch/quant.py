"""Low-precision dispatch: tokens travel as bf16 or fp8 (e4m3, one fp32 scale per token).

The experts still compute in the model's dtype: the receiver decodes. In
backward the gradients travel back at full precision (the rounding is treated
as the identity, a straight-through estimate). Shape legend: R rows, H hidden,
P bytes (or elements) of one encoded row.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Codec", "make_codec"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class Codec:
    """Encode rows ``[R, H]`` for the wire and decode them back to the model's dtype."""

    def __init__(self, name: str, model_dtype: torch.dtype) -> None:
        self.name, self.model_dtype = name, model_dtype

    @property
    def wire_dtype(self) -> torch.dtype:
        """The dtype of an encoded row."""
        return torch.bfloat16 if self.name == "bfloat16" else torch.uint8

    def row_bytes(self, H: int) -> int:
        return 2 * H if self.name == "bfloat16" else H + 4

    def encode(self, x_RH: Tensor) -> Tensor:
        """``[R, P]``: bf16 values, or ``H`` fp8 bytes then the 4 bytes of the fp32 scale."""
        if self.name == "bfloat16":
            return x_RH.detach().to(torch.bfloat16)
        xf = x_RH.detach().float()
        scale_R1 = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-30)
        q_RH = (xf / scale_R1).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([q_RH, scale_R1.view(torch.uint8)], dim=1)

    def decode(self, raw_RP: Tensor) -> Tensor:
        if self.name == "bfloat16":
            return raw_RP.to(self.model_dtype)
        H = raw_RP.shape[1] - 4
        q_RH = raw_RP[:, :H].contiguous().view(torch.float8_e4m3fn)
        scale_R1 = raw_RP[:, H:].contiguous().view(torch.float32)
        return (q_RH.float() * scale_R1).to(self.model_dtype)


def make_codec(dispatch_dtype: str | None, model_dtype: torch.dtype) -> Codec | None:
    """``None`` when tokens travel in the model's own dtype (nothing to encode)."""
    if dispatch_dtype is None or (dispatch_dtype == "bfloat16" and model_dtype == torch.bfloat16):
        return None
    return Codec(dispatch_dtype, model_dtype)


class Relay(torch.autograd.Function):
    """``out`` (computed outside autograd from ``x``), whose gradient for ``x`` is
    ``backward_fn(grad)``: ties an encoded transfer back into the graph."""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor, backward_fn) -> Tensor:
        ctx.backward_fn = backward_fn
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.backward_fn(grad.contiguous()), None, None
