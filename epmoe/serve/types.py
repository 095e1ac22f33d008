"""What the serving engine takes and gives: requests, sampling parameters, per-step outputs.

Plain data, no torch: these objects cross between the HTTP front (rank 0's event
loop), the engine thread, and the other ranks (pickled in the per-step
agreement, see :mod:`epmoe.serve.sync`). Text never reaches the engine: the
front tokenises, detokenises and finds stop strings; the engine sees token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FINISH_REASONS", "EngineDead", "QueueFull", "Request", "SamplingParams",
           "StepOutput"]

# "stop": EOS or a stop token/string; "length": max_tokens or the context length;
# "abort": cancelled (client gone, stop string found by the front); "error": failed.
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (validated by the API layer and here)."""

    max_tokens: int = 16  # new tokens at most (>= 1)
    temperature: float = 1.0  # 0: greedy (argmax); > 0: softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: the smallest set of tokens with probability >= top_p, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1: all
    seed: int | None = None  # a generator of its own: the same tokens whatever else runs
    ignore_eos: bool = False  # do not stop at the model's end-of-sequence token(s)
    stop_token_ids: tuple[int, ...] = ()  # also stop at these ("stop", the token is kept)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (all tokens) or a positive integer, "
                             f"got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class Request:
    """One sequence to generate: its prompt's token ids and how to sample."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request: the tokens it added (usually one;
    none for a prefill chunk that did not reach the end of the prompt), and, on its
    last output, why it finished."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None  # one of FINISH_REASONS once finished, else None
    num_prompt_tokens: int = 0
    error: str | None = None  # with finish_reason "error": what failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit: the front answers 429."""


class EngineDead(RuntimeError):
    """The engine stopped (a rank failed or stalled): the front answers 503."""
