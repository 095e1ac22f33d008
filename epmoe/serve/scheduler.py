"""Continuous batching on one rank: which tokens of which sequences run in the next step.

A pure object over two queues (nano-vllm's and vLLM V1's design, no torch):
there is no prefill or decode phase, only sequences whose cached tokens
(``num_computed``) lag behind their known tokens (prompt, then the tokens
generated so far). Each step:

1. every running sequence that has caught up gets one token (its last
   generated one: a decode step), up to ``max_num_seqs`` sequences;
2. the rest of the step's token budget (``max_num_batched_tokens``) goes to
   sequences still reading their prompt, oldest first, a chunk each (chunked
   prefill); a waiting request is admitted when there is room in the budget,
   in ``max_num_seqs`` and in the KV cache.

Admission reserves KV blocks for the request's whole length (prompt plus
``max_tokens``), as mini-sglang does, so a running sequence never needs a
block that is not there: no preemption, and memory is bounded by the cache's
size whatever the load. Requests that do not fit wait (the front bounds how many
are in flight, see ``EngineConfig.max_waiting``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockAllocator
from .types import Request

__all__ = ["Scheduler", "Sequence"]


@dataclass(eq=False)
class Sequence:
    """One request on this rank: its tokens and what of them the cache holds."""

    request: Request
    tokens: list[int]  # prompt, then generated tokens
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are cached

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def reserved_tokens(self) -> int:
        # The last generated token is never fed back, hence the - 1.
        return self.num_prompt + self.request.params.max_tokens - 1


class Scheduler:
    """Queues of one rank; see the module docstring."""

    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted, in admission order

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits_ever(self, request: Request) -> bool:
        """Whether the cache could hold this request at all (checked before queueing)."""
        n = len(request.prompt_ids) + request.params.max_tokens - 1
        return self.blocks_for(n) <= self.allocator.num_blocks

    def add(self, request: Request) -> Sequence:
        seq = Sequence(request, list(request.prompt_ids))
        self.waiting.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq.blocks)
        seq.blocks = []

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's ``(sequence, tokens to run)``, 1-token segments first."""
        budget = self.max_num_batched_tokens
        singles, chunks = [], []
        for seq in self.running:  # decode: one token for every sequence that caught up
            lag = len(seq.tokens) - seq.num_computed
            if lag == 1 and budget > 0:
                singles.append((seq, 1))
                budget -= 1
        for seq in self.running:  # prompts being read, oldest first
            lag = len(seq.tokens) - seq.num_computed
            if lag > 1 and budget > 0:
                n = min(lag, budget)
                (singles if n == 1 else chunks).append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = self.blocks_for(seq.reserved_tokens)
            if need > self.allocator.free:
                break  # first come, first served: no overtaking by smaller requests
            self.waiting.popleft()
            seq.blocks = self.allocator.allocate(need)
            self.running.append(seq)
            n = min(len(seq.tokens), budget)
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n
        return singles + chunks
