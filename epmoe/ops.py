"""Small tensor operations shared by dispatch, combine and the experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["INVARIANT_ROWS", "by_tiles", "capturing", "sum_rows"]

INVARIANT_ROWS = 32  # MoEConfig.batch_invariant: every product takes exactly this many rows


def capturing() -> bool:
    """Whether a CUDA graph is being captured now (nothing may be read on the host)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def by_tiles(fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]], x_MH: Tensor):
    """``fn(x)`` computed on fixed tiles of ``INVARIANT_ROWS`` rows (the last padded with
    zeros), the results (a tensor or a tuple of them, rows first) cut back to ``M`` rows:
    every row's result then has the same bits whatever the other rows
    (``MoEConfig.batch_invariant``).

    Why: CPU matrix libraries pick their kernel, and so the order of the additions, by
    the number of rows: a row alone, or among 10 others, can come out a bit different
    from the same row among 1000 (measured here for M < 16 in fp32 on one thread, up to
    a few hundred rows on two, and in bf16); and vectorised exp, sigmoid or silu can
    give a last element that the vector loop leaves over other bits than the others.
    With every call on the same shape, a row's result depends on that row only
    (checked in ``tests/test_rebalance.py``). Costs a call per tile (smaller products
    run slower on the CPU: ``benchmarks/batch_invariant.py``) and the padding.
    """
    M, B = x_MH.shape[0], INVARIANT_ROWS
    if M == 0:
        return fn(x_MH)
    tiles = -(-M // B)
    if tiles * B != M:
        x_MH = torch.cat([x_MH, x_MH.new_zeros((tiles * B - M, *x_MH.shape[1:]))])
    outs = [fn(x_MH[t * B : (t + 1) * B]) for t in range(tiles)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts)[:M] for parts in zip(*outs, strict=True))
    return torch.cat(outs)[:M]


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
