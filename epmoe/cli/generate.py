"""Generation from a Hugging Face MoE checkpoint, expert-parallel: the serving engine, offline.

    torchrun --nproc_per_node=2 -m epmoe generate --model DIR --prompt "Hello" --max-new-tokens 8
    torchrun --nproc_per_node=2 -m epmoe generate --model DIR --prompt-ids 1,2,3 --force-cpu
    torchrun --nproc_per_node=3 -m epmoe generate --model DIR --prompts-file prompts.txt
    python -m epmoe generate --model DIR --prompt-ids-file ids.txt --temperature 0.8 --seed 1

Prompts are spread over the ranks (prompt i on rank i % world size); each rank
runs all of its prompts at once on the engine of ``python -m epmoe serve``
(continuous batching, chunked prefill, a paged KV cache: vLLM's
``LLM.generate``), and joins the expert-parallel MoE layers with the others,
with zero tokens once it is done. Rank 0 prints every result in prompt order.
Greedy unless ``--temperature`` > 0. Text prompts (``--prompt``,
``--prompts-file``: one per line) need a tokenizer in the model directory;
token ids go with ``--prompt-ids`` or ``--prompt-ids-file`` (one line of
comma-separated ids per prompt). A ``--prompts-file`` line that is only
comma-separated integers is refused rather than guessed at.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..collectives import all_reduce_sum, gather_objects
from ..config import parse_dtype
from ..parallel_state import destroy_distributed, init_distributed

IDS_LINE = re.compile(r"^\s*\d+(\s*,\s*\d+)+\s*$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as comma-separated token ids, e.g. 1,2,3 (repeatable)")
    p.add_argument("--prompts-file", help="one text prompt per line (needs a tokenizer)")
    p.add_argument("--prompt-ids-file", help="one prompt per line, as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: all tokens")
    p.add_argument("--seed", type=int, default=None, help="per prompt: seed + its index")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per rank's batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per rank's step (longer prompts are prefilled in chunks)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the "
                                                 "checkpoint's)")
    p.add_argument("--placement", default="linear", choices=["linear", "round_robin"])
    p.add_argument("--force-cpu", action="store_true", help="CPU and gloo even with GPUs")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may take")


def _ids(text: str, flag: str = "--prompt-ids") -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("an empty prompt: give at least one token id")
    return ids


def _lines(path: str | None, flag: str) -> list[str]:
    if path is None:
        return []
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")
    return [ln for ln in Path(path).read_text().splitlines() if ln.strip()]


def _prompts(model_dir: Path, prompt: list[str], prompt_ids: list[str],
             prompts_file: str | None, prompt_ids_file: str | None):
    """(tokenizer or None, [(shown text, token ids)]) for every prompt, in order."""
    has_tok = (model_dir / "tokenizer.json").is_file() or \
        (model_dir / "tokenizer_config.json").is_file()
    tokenizer = None
    if has_tok:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = _lines(prompts_file, "--prompts-file")
    for n, line in enumerate(lines, 1):
        if IDS_LINE.match(line):
            raise ValueError(f"--prompts-file {prompts_file} line {n} is comma-separated "
                             f"integers ({line.strip()[:40]!r}): give token ids with "
                             "--prompt-ids-file, text with --prompts-file")
    texts = prompt + lines
    id_lists = [_ids(s) for s in prompt_ids] + \
        [_ids(s, "--prompt-ids-file") for s in _lines(prompt_ids_file, "--prompt-ids-file")]
    if texts and tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer: give prompts as --prompt-ids or "
                         "--prompt-ids-file")
    out = [(t, tokenizer(t)["input_ids"]) for t in texts] + [(",".join(map(str, i)), i)
                                                          for i in id_lists]
    if not out:
        raise ValueError("no prompt: give --prompt, --prompt-ids, --prompts-file or "
                         "--prompt-ids-file")
    if any(not ids for _, ids in out):
        raise ValueError("a prompt tokenised to no tokens")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    for shown, ids in out:
        if not all(0 <= i < vocab for i in ids):
            raise ValueError(f"prompt {shown!r}: token ids must lie in [0, {vocab}) "
                             f"(the model's vocab_size)")
    return tokenizer, out


def main(model: str, prompt: list[str], prompt_ids: list[str], prompts_file: str | None,
         prompt_ids_file: str | None, max_new_tokens: int, temperature: float, top_p: float,
         top_k: int, seed: int | None, ignore_eos: bool, max_num_seqs: int,
         max_num_batched_tokens: int, dtype: str | None, placement: str, force_cpu: bool,
         timeout: float) -> int:
    from ..hf.loading import from_pretrained
    from ..serve.config import EngineConfig
    from ..serve.engine import Engine
    from ..serve.types import Request, SamplingParams
    from .serve import _eos_ids

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no config.json there (not a model directory)")
    if dtype is not None:
        parse_dtype(dtype)
    def params(i: int) -> SamplingParams:  # prompt i's (bad values raise ValueError here)
        return SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, ignore_eos=ignore_eos,
                              seed=None if seed is None else seed + i)

    params(0)
    tokenizer, prompts = _prompts(model_dir, prompt, prompt_ids, prompts_file, prompt_ids_file)
    longest = max(len(ids) for _, ids in prompts) + max_new_tokens
    state = init_distributed(force_cpu=force_cpu, timeout_s=timeout)
    try:
        m = from_pretrained(model_dir, state, dtype=dtype, placement=placement)
        config = EngineConfig(max_model_len=longest, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens)
        engine = Engine(m, config, _eos_ids(model_dir, m.config), state.device)
        requests = [Request(str(i), tuple(ids), params(i)) for i, (_, ids) in enumerate(prompts)]
        if not all(engine.scheduler.fits_ever(r) for r in requests):  # (the same on every rank)
            raise ValueError(f"the KV cache ({engine.cache.num_blocks} blocks of "
                             f"{config.block_size} tokens) cannot hold the longest prompt with "
                             f"--max-new-tokens {max_new_tokens}")
        mine = {str(i): (i, p) for i, p in enumerate(prompts) if i % state.world_size ==
                state.rank}
        for rid in mine:
            engine.add(requests[int(rid)])
        new: dict[str, list[int]] = {rid: [] for rid in mine}
        t0 = time.perf_counter()
        world = dist.group.WORLD if dist.is_initialized() else None
        busy = torch.tensor([1], device=state.device)
        while True:  # one agreement per step: does any rank still have prompts?
            busy.fill_(int(engine.has_work))
            if int(all_reduce_sum(busy, world).item()) == 0:
                break
            for out in engine.step():
                new[out.request_id].extend(out.new_token_ids)
        seconds = time.perf_counter() - t0
        results = []
        for rid, (i, (shown, _)) in mine.items():
            text = tokenizer.decode(new[rid], skip_special_tokens=True) if tokenizer else None
            results.append((i, state.rank, shown, new[rid], text))
        report = (state.rank, sum(len(v) for v in new.values()), seconds,
                  m.epmoe.dummy_steps)
        gathered = gather_objects((results, report), world)
        if state.rank == 0:
            _print(model_dir, m, state, gathered, max_new_tokens, temperature)
    finally:
        destroy_distributed()
    return 0


def _print(model_dir: Path, m, state, gathered, max_new_tokens: int,
           temperature: float) -> None:
    c = m.epmoe.layers[0].config
    how = "greedy" if temperature == 0 else f"sampled at temperature {temperature}"
    print(f"{model_dir} ({m.config.model_type}): {len(m.epmoe.layers)} MoE layers of "
          f"{c.num_experts} experts, top-{c.top_k}; EP={state.ep_size} over {state.world_size} "
          f"rank(s), {state.backend or 'no process group'} on {state.device.type}, "
          f"{str(c.dtype).removeprefix('torch.')}; {how}, up to {max_new_tokens} new tokens")
    rows = sorted((r for results, _ in gathered for r in results), key=lambda r: r[0])
    for i, rank, shown, new, text in rows:
        ids = ",".join(map(str, new))
        print(f"[{i}] (rank {rank}) {shown!r} -> " + (f"{text!r} [{ids}]" if text is not None
                                                      else ids))
    for _, (rank, n, seconds, dummy) in gathered:
        print(f"rank {rank}: {n} new tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} "
              f"tokens/s), {dummy} zero steps after its own prompts")
