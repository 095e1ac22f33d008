"""Offline throughput: ``epmoe generate`` (2 ranks) beside transformers' batched ``generate``.

    python benchmarks/generate_offline.py                 # 3 interleaved repetitions
    python benchmarks/generate_offline.py --reps 1 --no-markdown

The serving benchmark's checkpoint and prompts: the 32 prompts of 128 token ids
that ``serve_bench.py`` sends (seed 0, after its warm-up prompt), written to a
file of comma-separated id lines. Each repetition runs, each in a fresh process:

    torchrun --nproc_per_node=2 -m epmoe generate --model benchmarks/.serving_model \\
        --prompt-ids-file FILE --max-new-tokens 64 --ignore-eos --dtype bfloat16 --force-cpu

(rank 0 prints each rank's ``N new tokens in S s``: its generation loop, after
loading; the group's throughput is all ranks' tokens / the slowest rank's
seconds), then transformers' ``model.generate`` of the same 32 prompts in one
batch (bf16, 2 threads, greedy, ``max_new_tokens = min_new_tokens = 64``, left
padding), timed on its first call in that process, cold as epmoe's loop is, and
on a second call (warm). The two kinds alternate; the figures are medians over
the repetitions. Writes ``results/generate_offline_<date>.json`` and rewrites
SERVING.md through ``serving_report.py`` (its "Offline generate" section).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

EPMOE_CMD = ("torchrun --nproc_per_node=2 -m epmoe generate --model benchmarks/.serving_model "
             "--prompt-ids-file FILE --max-new-tokens {new} --ignore-eos --dtype bfloat16 "
             "--force-cpu")
RANK_LINE = re.compile(r"rank (\d+): (\d+) new tokens in ([\d.]+) s")


def prompts(model: str, num: int, input_len: int, seed: int) -> list[list[int]]:
    """serve_bench's prompts: the same ids the serving benchmark sends (less its warm-up one)."""
    import serve_bench
    from transformers import AutoTokenizer

    return serve_bench.make_prompts(AutoTokenizer.from_pretrained(model), num + 1, input_len,
                                    seed)[1:]


def run_epmoe(model: str, ids_file: str, new_tokens: int) -> dict:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "epmoe",
            "generate", "--model", model, "--prompt-ids-file", ids_file, "--max-new-tokens",
            str(new_tokens), "--ignore-eos", "--dtype", "bfloat16", "--force-cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"epmoe generate failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    ranks = [(int(r), int(n), float(s)) for r, n, s in RANK_LINE.findall(proc.stdout)]
    if len(ranks) != 2:
        raise RuntimeError(f"expected 2 'rank N: ... new tokens in' lines:\n{proc.stdout[-2000:]}")
    tokens, seconds = sum(n for _, n, _ in ranks), max(s for _, _, s in ranks)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "ranks": [{"rank": r, "tokens": n, "seconds": s} for r, n, s in ranks],
            "process_wall_s": wall}


def _snapshot() -> tuple[float, int, int]:
    """(time, all CPUs' busy ticks, ticks of this process and all it started)."""
    import serving

    return time.monotonic(), serving._busy_ticks(), serving._tree_ticks(os.getpid())


def _other_cores(before: tuple, after: tuple) -> float:
    """Cores other processes kept busy on average between two snapshots."""
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, other / os.sysconf("SC_CLK_TCK") / (after[0] - before[0]))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_worker(model: str, ids_file: str, new_tokens: int, threads: int) -> dict:
    """transformers' batched generate, in this process: first call (cold), second (warm)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    rows = [[int(t) for t in line.split(",")] for line in Path(ids_file).read_text().split()]
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    pad = m.generation_config.pad_token_id
    pad = pad if pad is not None else (m.generation_config.eos_token_id or 0)
    pad = pad[0] if isinstance(pad, list) else pad
    width = max(len(r) for r in rows)  # left padding (all 128 here: none is added)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = {}
    for name in ("cold", "warm"):
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = m.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad)
        seconds = time.perf_counter() - t0
        if gen.shape[1] - width != new_tokens:
            raise RuntimeError(f"{gen.shape[1] - width} new tokens, not {new_tokens}")
        tokens = gen[:, width:].numel()
        out[name] = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
    out["threads"] = torch.get_num_threads()
    return out


def run_hf(model: str, ids_file: str, new_tokens: int, threads: int) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", "--model", model,
            "--ids-file", ids_file, "--max-new-tokens", str(new_tokens), "--threads",
            str(threads)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode:
        raise RuntimeError(f"transformers generate failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(model: str = str(HERE / ".serving_model"), reps: int = 3, num_prompts: int = 32,
         input_len: int = 128, max_new_tokens: int = 64, threads: int = 2, seed: int = 0,
         out_dir: str = str(HERE / "results"), markdown: bool = True) -> dict:
    model = str(Path(model).resolve())
    rows = prompts(model, num_prompts, input_len, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = str(Path(tmp) / "prompt_ids.txt")
        Path(ids_file).write_text("".join(",".join(map(str, r)) + "\n" for r in rows))
        reps_out = []
        for i in range(reps):
            load = os.getloadavg()[0]
            before = _snapshot()
            ep = run_epmoe(model, ids_file, max_new_tokens)
            print(f"rep {i}: epmoe generate {ep['tok_s']:.1f} tok/s ({ep['tokens']} tokens, "
                  f"slowest rank {ep['seconds']:.2f} s)", flush=True)
            hf = run_hf(model, ids_file, max_new_tokens, threads)
            print(f"rep {i}: transformers generate {hf['cold']['tok_s']:.1f} tok/s cold, "
                  f"{hf['warm']['tok_s']:.1f} warm", flush=True)
            reps_out.append({"epmoe": ep, "transformers": hf, "load_avg_1min": {
                "before": load, "after": os.getloadavg()[0]},
                "other_cpu_cores": _other_cores(before, _snapshot())})
            print(f"rep {i}: other processes kept {reps_out[-1]['other_cpu_cores']:.2f} cores "
                  f"busy", flush=True)

    def med(vals):
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    ep_tok = [r["epmoe"]["tok_s"] for r in reps_out]
    cold = [r["transformers"]["cold"]["tok_s"] for r in reps_out]
    warm = [r["transformers"]["warm"]["tok_s"] for r in reps_out]
    summary = {
        "date": str(datetime.date.today()), "reps": reps,
        "workload": dict(num_prompts=num_prompts, input_len=input_len,
                         max_new_tokens=max_new_tokens, seed=seed, threads_hf=threads),
        "epmoe_command": EPMOE_CMD.format(new=max_new_tokens),
        "transformers_call": (f"AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16)"
                              f".generate(input_ids, attention_mask, do_sample=False, "
                              f"max_new_tokens={max_new_tokens}, "
                              f"min_new_tokens={max_new_tokens}) on 32 left-padded rows, "
                              f"torch.set_num_threads({threads})"),
        "epmoe_tok_s": med(ep_tok), "transformers_cold_tok_s": med(cold),
        "transformers_warm_tok_s": med(warm),
        "ratio_epmoe_to_transformers_cold": med([e / c for e, c in zip(ep_tok, cold,
                                                                          strict=True)]),
        "ratio_epmoe_to_transformers_warm": med([e / w for e, w in zip(ep_tok, warm,
                                                                          strict=True)]),
        "other_cpu_cores_max": max(r["other_cpu_cores"] for r in reps_out),
        "runs": reps_out,
    }
    path = Path(out_dir) / f"generate_offline_{summary['date']}.json"
    path.write_text(json.dumps(summary, indent=1))
    s = summary
    print(f"epmoe generate (2 ranks): {s['epmoe_tok_s']['median']:.1f} tok/s "
          f"(min-max {s['epmoe_tok_s']['min']:.1f}-{s['epmoe_tok_s']['max']:.1f})")
    print(f"transformers generate: {s['transformers_cold_tok_s']['median']:.1f} tok/s cold, "
          f"{s['transformers_warm_tok_s']['median']:.1f} warm")
    print(f"ratio epmoe / transformers: "
          f"{s['ratio_epmoe_to_transformers_cold']['median']:.2f} (cold), "
          f"{s['ratio_epmoe_to_transformers_warm']['median']:.2f} (warm); wrote {path}")
    if markdown:
        import serving_report

        serving_report.rewrite_markdown()
    return summary


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE / ".serving_model"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="transformers' torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--no-markdown", dest="markdown", action="store_false",
                   help="do not rewrite SERVING.md")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ids-file", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.hf_worker:
        print(json.dumps(hf_worker(a.model, a.ids_file, a.max_new_tokens, a.threads)))
    else:
        del a.hf_worker, a.ids_file
        main(**vars(a))
