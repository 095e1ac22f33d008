"""Greedy generation from a Hugging Face MoE checkpoint, expert-parallel over the ranks.

    torchrun --nproc_per_node=2 -m epmoe generate --model DIR --prompt "Hello" --max-new-tokens 8
    torchrun --nproc_per_node=2 -m epmoe generate --model DIR --prompt-ids 1,2,3 --force-cpu
    torchrun --nproc_per_node=3 -m epmoe generate --model DIR --prompts-file prompts.txt

Prompts are spread over the ranks (prompt i on rank i % world size); each rank
runs its own prompts through the dense layers and joins the expert-parallel
MoE layers with the others, idling with zero tokens once it is done. Rank 0
prints every result in prompt order. Text prompts need a tokenizer in the
model directory; otherwise give token ids (``--prompt-ids``, or a prompts
file of comma-separated ids).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..collectives import gather_objects
from ..config import parse_dtype
from ..parallel_state import destroy_distributed, init_distributed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as comma-separated token ids, e.g. 1,2,3 (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line (text, or ids without tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the "
                                                 "checkpoint's)")
    p.add_argument("--placement", default="linear", choices=["linear", "round_robin"])
    p.add_argument("--force-cpu", action="store_true", help="CPU and gloo even with GPUs")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may take")


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("an empty prompt: give at least one token id")
    return ids


def _prompts(model_dir: Path, prompt: list[str], prompt_ids: list[str],
             prompts_file: str | None):
    """(tokenizer or None, [(shown text, token ids)]) for every prompt, in order."""
    has_tok = (model_dir / "tokenizer.json").is_file() or \
        (model_dir / "tokenizer_config.json").is_file()
    tokenizer = None
    if has_tok:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if prompts_file is not None and not Path(prompts_file).is_file():
        raise ValueError(f"--prompts-file {prompts_file}: no such file")
    lines = [] if prompts_file is None else \
        [ln for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
    texts = prompt + (lines if tokenizer is not None else [])
    id_lists = [_ids(s) for s in prompt_ids + (lines if tokenizer is None else [])]
    if texts and tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer: give prompts as --prompt-ids")
    out = [(t, tokenizer(t)["input_ids"]) for t in texts] + [(",".join(map(str, i)), i)
                                                          for i in id_lists]
    if not out:
        raise ValueError("no prompt: give --prompt, --prompt-ids or --prompts-file")
    if any(not ids for _, ids in out):
        raise ValueError("a prompt tokenised to no tokens")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    for shown, ids in out:
        if not all(0 <= i < vocab for i in ids):
            raise ValueError(f"prompt {shown!r}: token ids must lie in [0, {vocab}) "
                             f"(the model's vocab_size)")
    return tokenizer, out


def main(model: str, prompt: list[str], prompt_ids: list[str], prompts_file: str | None,
         max_new_tokens: int, dtype: str | None, placement: str, force_cpu: bool,
         timeout: float) -> int:
    from ..hf.loading import from_pretrained

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no config.json there (not a model directory)")
    if dtype is not None:
        parse_dtype(dtype)
    tokenizer, prompts = _prompts(model_dir, prompt, prompt_ids, prompts_file)
    state = init_distributed(force_cpu=force_cpu, timeout_s=timeout)
    try:
        m = from_pretrained(model_dir, state, dtype=dtype, placement=placement)
        mine = [(i, p) for i, p in enumerate(prompts) if i % state.world_size == state.rank]
        results, error, t0 = [], None, time.perf_counter()
        try:
            with m.epmoe.session():  # idle (zero tokens) once this rank's prompts are done
                for i, (shown, ids) in mine:
                    x = torch.tensor([ids], device=state.device)
                    y = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=max_new_tokens)
                    new = y[0, len(ids):].tolist()
                    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer else None
                    results.append((i, state.rank, shown, new, text))
        except Exception as e:  # noqa: BLE001 (reported by rank 0 with the others' results)
            error = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        report = (state.rank, sum(len(r[3]) for r in results), seconds, m.epmoe.dummy_steps,
                  error)
        gathered = gather_objects((results, report), dist.group.WORLD)
        if state.rank == 0:
            _print(model_dir, m, state, gathered, max_new_tokens)
    finally:
        destroy_distributed()
    return 1 if any(report[-1] for _, report in gathered) else 0


def _print(model_dir: Path, m, state, gathered, max_new_tokens: int) -> None:
    c = m.epmoe.layers[0].config
    print(f"{model_dir} ({m.config.model_type}): {len(m.epmoe.layers)} MoE layers of "
          f"{c.num_experts} experts, top-{c.top_k}; EP={state.ep_size} over {state.world_size} "
          f"rank(s), {state.backend or 'no process group'} on {state.device.type}, "
          f"{str(c.dtype).removeprefix('torch.')}; greedy, up to {max_new_tokens} new tokens")
    rows = sorted((r for results, _ in gathered for r in results), key=lambda r: r[0])
    for i, rank, shown, new, text in rows:
        ids = ",".join(map(str, new))
        print(f"[{i}] (rank {rank}) {shown!r} -> " + (f"{text!r} [{ids}]" if text is not None
                                                      else ids))
    for _, (rank, n, seconds, dummy, error) in gathered:
        print(f"rank {rank}: {n} new tokens in {seconds:.2f} s, {dummy} idle steps after its "
              "own prompts" + (f"; FAILED: {error}" if error else ""))
