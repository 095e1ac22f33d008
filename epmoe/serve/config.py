"""The serving engine's settings: one frozen, validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineConfig"]


@dataclass(frozen=True)
class EngineConfig:
    """Per-rank limits of the engine (vLLM's names; ``max_num_seqs`` is per rank, as
    vLLM's is per data-parallel rank)."""

    max_model_len: int  # prompt + generated tokens of one sequence, at most
    max_num_seqs: int = 256  # sequences in one rank's running batch
    max_num_batched_tokens: int = 2048  # tokens in one rank's step (prefill is chunked to fit)
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_bytes: int = 4 << 30  # the KV cache of one rank, at most (bytes)
    # requests in flight beyond the running ones, per rank: the front admits at most
    # world_size * (max_num_seqs + max_waiting) at once and answers 429 past that
    max_waiting: int = 1024
    idle_wait_s: float = 1.0  # all ranks idle: rank 0 wakes the group at least this often
    # bf16 on the CPU: run on oneDNN's prepacked weights (epmoe.packed; the same bits,
    # 1.4-1.5x faster decode). Off for live rebalancing, which moves the plain weights.
    pack_weights: bool = True
    # CPU ranks of one host: the MoE layers' all-to-alls through shared memory (epmoe.shm;
    # about 1 ms less per collective than gloo here). Inference only, as the engine is.
    shm_all_to_all: bool = True

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "kv_cache_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:  # (vLLM's rule too)
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                             f">= max_num_seqs ({self.max_num_seqs}): every running sequence "
                             "needs a token of the step's budget")
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ValueError(f"max_waiting must be an integer >= 0, got {self.max_waiting!r}")
        if not self.idle_wait_s > 0:
            raise ValueError(f"idle_wait_s must be > 0 seconds, got {self.idle_wait_s!r}")
