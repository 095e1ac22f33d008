"""Text tasks for the training example: batches of byte tokens, the same for a given step.

A batch depends only on ``(seed, step, rank)``, never on what ran before, so a run
resumed from a checkpoint at step n sees exactly the batches it would have seen.

- :class:`SumsTask` (synthetic, nothing to download): lines ``"417+85=502\\n"`` of
  random numbers and their sums, packed into sequences. A model learns the format
  at once and the digits of the sum slowly.
- :class:`TextFileTask`: random windows of a text file's bytes.

Tokens are bytes (0-255), the vocabulary of the tiny checkpoints
(:mod:`epmoe.hf.tiny`); a model needs ``vocab_size >= 256``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SumsTask", "TextFileTask", "make_task"]


class SumsTask:
    """Sequences of ``a+b=c`` lines, operands of 1 to ``max_digits`` digits."""

    name = "sums"

    def __init__(self, seed: int = 0, max_digits: int = 3) -> None:
        if max_digits < 1:
            raise ValueError(f"SumsTask max_digits must be >= 1, got {max_digits}")
        self.seed, self.max_digits = seed, max_digits

    def _line(self, rnd: random.Random) -> str:
        a, b = (rnd.randrange(10 ** rnd.randint(1, self.max_digits)) for _ in range(2))
        return f"{a}+{b}={a + b}\n"

    def batch(self, step: int, rank: int, batch_size: int, seq_len: int) -> Tensor:
        """``[batch_size, seq_len]`` int64 byte ids for ``rank`` at ``step``."""
        rnd = random.Random(f"sums-{self.seed}-{step}-{rank}")  # (a str seed: stable anywhere)
        rows = []
        for _ in range(batch_size):
            text = ""
            while len(text) < seq_len:
                text += self._line(rnd)
            rows.append(list(text[:seq_len].encode()))
        return torch.tensor(rows, dtype=torch.long)


class TextFileTask:
    """Windows of ``seq_len`` bytes at random offsets of a file."""

    name = "text"

    def __init__(self, path: str | Path, seed: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"--text {self.path}: no such file")
        self.data = self.path.read_bytes()
        self.seed = seed

    def batch(self, step: int, rank: int, batch_size: int, seq_len: int) -> Tensor:
        if len(self.data) < seq_len + 1:
            raise ValueError(f"--text {self.path} has {len(self.data)} bytes; a sequence of "
                             f"--seq-len {seq_len} needs at least {seq_len + 1}")
        rnd = random.Random(f"text-{self.seed}-{step}-{rank}")
        starts = [rnd.randrange(len(self.data) - seq_len) for _ in range(batch_size)]
        return torch.tensor([list(self.data[s : s + seq_len]) for s in starts], dtype=torch.long)


def make_task(text: str | None, seed: int) -> SumsTask | TextFileTask:
    return TextFileTask(text, seed) if text else SumsTask(seed)
