"""What ``pack_for_inference`` gains: the serving model's forward, packed against plain.

    python benchmarks/serving_model.py      # once, if benchmarks/.serving_model is missing
    python benchmarks/packed.py [--reps 9] [--threads 1] [--json out.json]

The serving benchmark's Qwen3-MoE (4 layers, H 1024, 8 experts of F 2048, top-2)
in bf16 at EP=1, loaded twice, the second copy packed. Forwards without a KV
cache: a decode-like batch (16 and 64 sequences of one token) and a prefill (one
sequence of 2048 tokens). The two models' forwards are interleaved (order
alternating), after two warm-up rounds; medians of ``--reps``. Also checks
that the logits are the same bits, and the memory (resident set) that packing
adds or frees: the packed weights take what the plain ones took (oneDNN pads only
to its blocks), but glibc may keep the freed plain pages for the next allocations
(the first forward then grows the resident set by that much less).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

import epmoe
from epmoe.hf import from_pretrained
from epmoe.packed import pack_for_inference

MODEL = Path(__file__).resolve().parent / ".serving_model"
CASES = {"decode 16": (16, 1), "decode 64": (64, 1), "prefill 2048": (1, 2048)}  # (batch, seq)


def rss() -> int:
    """Resident bytes, after handing freed heap memory back (glibc keeps it otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process(os.getpid()).memory_info().rss


def main(model_dir: Path = MODEL, reps: int = 9, threads: int = 1,
         json_out: str | None = None) -> dict:
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} missing: run python benchmarks/serving_model.py")
    torch.set_num_threads(threads)
    state = epmoe.single_process_state("cpu")
    first = torch.zeros(16, 1, dtype=torch.long)  # a first forward, for the memory
    before = rss()
    plain = from_pretrained(model_dir, state, dtype="bfloat16")
    loaded = rss()
    model_bytes = loaded - before
    with torch.inference_mode():
        plain(first)
    plain_fwd = rss() - loaded
    packed = from_pretrained(model_dir, state, dtype="bfloat16")
    loaded = rss()
    t0 = time.perf_counter()
    report = pack_for_inference(packed)
    pack_s = time.perf_counter() - t0
    after_pack = rss() - loaded
    with torch.inference_mode():
        packed(first)
    packed_fwd = rss() - loaded - after_pack
    mib = 2**20
    mem = dict(plain_weight_bytes=report.bytes, copied_bytes=report.copied_bytes,
               rss_load_bytes=model_bytes, rss_after_pack_bytes=after_pack,
               rss_first_forward_plain_bytes=plain_fwd, rss_first_forward_packed_bytes=packed_fwd,
               pack_seconds=round(pack_s, 2), linears=report.linears,
               moe_layers=report.moe_layers)
    print(f"packed {report.linears} linears and {report.moe_layers} MoE layers: "
          f"{report.bytes / mib:.1f} MiB of plain bf16 weights in {pack_s:.2f} s")
    print(f"resident set: a model {mem['rss_load_bytes'] / mib:.1f} MiB; packing "
          f"{after_pack / mib:+.1f} MiB, then the first 16-token forward {packed_fwd / mib:+.1f} "
          f"MiB (plain model's: {plain_fwd / mib:+.1f} MiB)")
    vocab = packed.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    results = {}
    print(f"bf16, EP=1, {threads} thread(s), median of {reps} interleaved forwards (ms)")
    print(f"{'case':>14} {'plain':>9} {'packed':>9} {'speedup':>8}  same bits")
    models = {"plain": plain, "packed": packed}
    with torch.inference_mode():
        for case, (batch, seq) in CASES.items():
            ids = torch.randint(0, vocab, (batch, seq), generator=gen)
            ms = {k: [] for k in models}
            for i in range(reps + 2):
                order = list(models) if i % 2 == 0 else list(models)[::-1]
                for k in order:
                    t = time.perf_counter()
                    models[k](ids)
                    if i >= 2:  # (two warm-up rounds)
                        ms[k].append(1e3 * (time.perf_counter() - t))
            same = torch.equal(plain(ids).logits, packed(ids).logits)
            med = {k: statistics.median(v) for k, v in ms.items()}
            results[case] = dict(plain_ms=round(med["plain"], 2),
                                 packed_ms=round(med["packed"], 2),
                                 speedup=round(med["plain"] / med["packed"], 3), same_bits=same)
            print(f"{case:>14} {med['plain']:9.1f} {med['packed']:9.1f} "
                  f"{med['plain'] / med['packed']:7.2f}x  {same}")
    out = dict(model=str(model_dir), threads=threads, reps=reps, memory=mem, cases=results,
               torch=torch.__version__)
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", dest="json_out")
    a = p.parse_args()
    main(a.model, a.reps, a.threads, a.json_out)
