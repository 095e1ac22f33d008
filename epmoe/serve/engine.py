"""One rank's serving engine: schedule, run the model on one packed step, sample, finish.

Each rank runs its own requests through the replicated dense layers (data-
parallel attention, with a KV cache of its own) and joins every MoE layer's
dispatch and combine with the other ranks of its EP group. A step is
schedule -> run -> postprocess (nano-vllm's ``llm_engine``). Which requests a
rank gets, and whether the group steps at all, is decided in
:mod:`epmoe.serve.sync`; a rank that has nothing to run in a step the group
takes runs a zero step (every MoE layer on zero tokens,
:meth:`epmoe.hf.Lockstep.zero_step`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface

from .config import EngineConfig
from .kv_cache import (
    ATTN_IMPLEMENTATION,
    BlockAllocator,
    KVCache,
    check_attention_only,
    paged_attention,
    step_batch,
    using,
)
from .sampling import make_generator, sample
from .scheduler import Scheduler, Sequence
from .types import Request, StepOutput

__all__ = ["Engine", "RankReport"]

AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)


class RankReport(NamedTuple):
    """What a rank tells the others each step (see :mod:`epmoe.serve.sync`)."""

    outputs: list[StepOutput]  # what its last step produced
    running: int
    waiting: int
    kv_blocks_used: int
    has_work: bool
    tokens_per_expert: list[list[int]]  # [L][E] this rank's token choices since the last
    #   report (E: the most experts of any layer; a layer with fewer has zeros past its own)
    remote_bytes: int  # bytes of token rows to and from other ranks since the last report


class Engine:
    """The engine of one rank over a model from :func:`epmoe.hf.from_pretrained`."""

    def __init__(self, model: nn.Module, config: EngineConfig, eos_token_ids: tuple[int, ...],
                 device: torch.device) -> None:
        check_attention_only(model.config)
        self.model, self.config, self.device = model, config, device
        self.eos_token_ids = frozenset(eos_token_ids)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if config.pack_weights:  # bf16 on the CPU: oneDNN's prepacked weights, same bits
            from ..packed import pack_for_inference

            pack_for_inference(model)
        self.lockstep = model.epmoe  # the MoE layers' step protocol (epmoe.hf.Lockstep)
        # Which ranks step is agreed before each step (epmoe.serve.sync; generate's loop),
        # so the lockstep's own all-reduce per forward is not needed.
        self.lockstep.external_agreement = True
        state = self.lockstep.state
        if config.shm_all_to_all and state.ep_size > 1 and device.type == "cpu":
            from ..shm import attach

            attach(state.ep_group, timeout_s=state.timeout_s)  # (a collective of the group)
        for layer in self.lockstep.layers:
            layer.count_tokens = True
        layers = self.lockstep.layers  # per-layer statistics between two reports:
        self._counts_LE = torch.zeros((len(layers), max(lay.config.num_experts for lay in layers)),
                                      dtype=torch.int64, device=device)  # token choices
        self._rows_reported = [self._remote_rows(lay) for lay in layers]  # rows sent so far
        # A probe step on one block learns each layer's key and value shapes; then the
        # cache gets as many blocks as kv_cache_bytes holds (none needed past max_num_seqs
        # full-length sequences).
        self.cache = KVCache(1, config.block_size, device)
        self._forward([([0], 0, 1)], torch.zeros(1, dtype=torch.long), [0], None)
        per_block = self.cache.bytes_per_token * config.block_size
        wanted = config.max_num_seqs * -(-config.max_model_len // config.block_size)
        num_blocks = min(config.kv_cache_bytes // per_block, wanted)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no block of "
                             f"{per_block} bytes ({config.block_size} tokens)")
        self.cache = KVCache(num_blocks, config.block_size, device)
        self.scheduler = Scheduler(BlockAllocator(num_blocks), config.block_size,
                                   config.max_num_seqs, config.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self.report([])  # (forget the probe's token)
        self.steps = 0

    # ------------------------------------------------------------------ requests

    def add(self, request: Request) -> StepOutput | None:
        """Queue a request; an output (finished, ``"error"``) if it can never run here."""
        n = len(request.prompt_ids) + request.params.max_tokens
        if n > self.config.max_model_len or not self.scheduler.fits_ever(request):
            return StepOutput(request.request_id, (), "error", len(request.prompt_ids),
                              f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                              f"({request.params.max_tokens}) exceeds the context "
                              f"({self.config.max_model_len}) or the KV cache")
        self.seqs[request.request_id] = self.scheduler.add(request)
        self._generators[request.request_id] = make_generator(request.params, self.device)
        return None

    def abort(self, request_id: str) -> StepOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None  # finished already, or never here
        self._finish(seq)
        return StepOutput(request_id, (), "abort", seq.num_prompt)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        del self.seqs[seq.request.request_id]
        del self._generators[seq.request.request_id]

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @staticmethod
    def _remote_rows(layer) -> int:
        return sum(layer.rows_sent) - layer.rows_sent[layer.state.ep_rank]

    def report(self, outputs: list[StepOutput]) -> RankReport:
        layers = self.lockstep.layers
        counts = self._counts_LE.tolist()  # NOTE: one host sync per step
        self._counts_LE.zero_()
        # Token rows this rank put on the wire to other ranks in dispatch, and got back in
        # combine (the layers count them: MoE layer's rows_sent).
        now = [self._remote_rows(lay) for lay in layers]
        sent = sum(2 * (n - b) * lay.config.hidden_size * lay.config.dtype.itemsize
                   for n, b, lay in zip(now, self._rows_reported, layers, strict=True))
        self._rows_reported = now
        s = self.scheduler
        return RankReport(outputs, len(s.running), len(s.waiting),
                          s.allocator.num_blocks - s.allocator.free, s.has_work, counts, sent)

    # ------------------------------------------------------------------ a step

    def step(self) -> list[StepOutput]:
        """Run one step of the group: this rank's scheduled tokens, or a zero step."""
        self.steps += 1
        plan = self.scheduler.schedule()
        if not plan:
            self.lockstep.zero_step()
            return []
        ids, pos, segments, rows, last = [], [], [], [], -1
        for seq, n in plan:
            start = seq.num_computed
            ids.extend(seq.tokens[start : start + n])
            pos.extend(range(start, start + n))
            segments.append((seq.blocks, start, n))
            last += n
            if start + n == len(seq.tokens):  # caught up: it gets its next token now
                rows.append(last)
        sampled = [seq for seq, n in plan if seq.num_computed + n == len(seq.tokens)]
        logits_RV = self._forward(segments, torch.tensor(ids, dtype=torch.long), pos,
                                  torch.tensor(rows, dtype=torch.long))  # (rows may be [])
        for seq, n in plan:
            seq.num_computed += n
        tokens = sample(logits_RV, [s.request.params for s in sampled],
                        [self._generators[s.request.request_id] for s in sampled])
        outputs = []
        for seq, tok in zip(sampled, tokens, strict=True):
            seq.tokens.append(tok)
            reason = self._finish_reason(seq, tok)
            outputs.append(StepOutput(seq.request.request_id, (tok,), reason, seq.num_prompt))
            if reason is not None:
                self._finish(seq)
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.request.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_generated >= p.max_tokens or len(seq.tokens) >= self.config.max_model_len:
            return "length"
        return None

    def _forward(self, segments, ids_T: torch.Tensor, pos: list[int],
                 rows_R: torch.Tensor | None) -> torch.Tensor:
        """The model on one packed row; logits ``[R, V]`` (fp32) of the rows ``rows_R``."""
        batch = step_batch(self.cache, segments)
        with torch.no_grad(), using(batch):
            out = self.model(input_ids=ids_T.to(self.device)[None],
                             position_ids=torch.tensor([pos], device=self.device),
                             use_cache=False,
                             logits_to_keep=(rows_R if rows_R is not None
                                             else torch.tensor([len(pos) - 1])).to(self.device))
        for i, layer in enumerate(self.lockstep.layers):
            if layer._load_E is not None:
                self._counts_LE[i] += layer._load_E  # (on the device: no sync here)
        return out.logits[0].float()
