"""Small tensor operations shared by dispatch, combine and the experts."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["capturing", "sum_rows"]


def capturing() -> bool:
    """Whether a CUDA graph is being captured now (nothing may be read on the host)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def sum_rows(src_MH: Tensor, rows_M: Tensor, slots_M: Tensor, num_rows: int,
             num_slots: int) -> Tensor:
    """``out[r] = sum of src[m] with rows[m] == r``, deterministic, in src's dtype: ``[R, H]``.

    Each (row, slot) pair occurs at most once, ``slots_M < num_slots``. On the
    CPU an in-place ``index_add_`` adds in index order (deterministic; tested
    with several threads) into a fresh buffer, in ``src``'s dtype (a bf16 row
    sums its few pairs in bf16, as transformers does: a conversion to fp32 and
    back would cost more than the sum). On other devices ``index_add_`` would
    use atomics, so there each pair gets its own (row, slot) place in an
    ``[R, S, H]`` buffer, summed over slots in a fixed order, in fp32.

    >>> sum_rows(torch.tensor([[1.], [2.], [4.]]), torch.tensor([0, 1, 0]),
    ...          torch.tensor([0, 0, 1]), num_rows=3, num_slots=2)
    tensor([[5.],
            [2.],
            [0.]])
    """
    H = src_MH.shape[1]
    if src_MH.device.type == "cpu":
        return src_MH.new_zeros((num_rows, H)).index_add_(0, rows_M, src_MH)
    buf = src_MH.new_zeros((num_rows * num_slots, H))
    buf = buf.index_copy(0, rows_M * num_slots + slots_M, src_MH)
    acc = torch.promote_types(src_MH.dtype, torch.float32)  # (float64 stays float64)
    return buf.view(num_rows, num_slots, H).sum(1, dtype=acc).to(src_MH.dtype)
