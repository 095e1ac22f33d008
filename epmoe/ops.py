"""Small tensor operations shared by dispatch, combine and the experts."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sum_rows"]


def sum_rows(src_MH: Tensor, rows_M: Tensor, slots_M: Tensor, num_rows: int,
             num_slots: int) -> Tensor:
    """``out[r] = sum of src[m] with rows[m] == r``, in fp32, deterministic -> ``[R, H]``.

    Each (row, slot) pair occurs at most once, ``slots_M < num_slots``. On the
    CPU ``index_add`` adds in index order (deterministic; tested with several
    threads); on other devices it would use atomics, so there each pair gets
    its own (row, slot) place in an ``[R, S, H]`` buffer, summed over slots in
    a fixed order.

    >>> sum_rows(torch.tensor([[1.], [2.], [4.]]), torch.tensor([0, 1, 0]),
    ...          torch.tensor([0, 0, 1]), num_rows=3, num_slots=2)
    tensor([[5.],
            [2.],
            [0.]])
    """
    H = src_MH.shape[1]
    if src_MH.device.type == "cpu":
        out = src_MH.new_zeros((num_rows, H), dtype=torch.float32)
        return out.index_add(0, rows_M, src_MH.float())
    buf = src_MH.new_zeros((num_rows * num_slots, H), dtype=torch.float32)
    buf = buf.index_copy(0, rows_M * num_slots + slots_M, src_MH.float())
    return buf.view(num_rows, num_slots, H).sum(1)
