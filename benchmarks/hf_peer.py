"""epmoe's from_pretrained beside transformers 5's own expert parallelism, on one checkpoint.

    python benchmarks/hf_peer.py                  # all phases; writes benchmarks/results/
    python benchmarks/hf_peer.py --nproc 2 --reps 15

Needs the ``bench`` extra (accelerate, which transformers' EP requires).
Three kinds of runs, each in fresh processes (peak RSS is per process):

* memory: peak resident memory per rank of one load, for transformers on one
  process, epmoe with EP=1, 2 and 4, and transformers' EP with 2 ranks;
* time: on 2 ranks, epmoe and transformers' EP loaded side by side in the same
  processes, forwards interleaved on the same tokens: median time of each and
  their ratio; logits of both against transformers on one process.

transformers' EP needs ``ep_size`` to divide ``tp_size * fsdp_size``. Two of
its layouts are measured: ``tp`` (``tp_size=ep_size=2`` with every dense rule
replaced by "replicate", so the dense layers stay whole as in epmoe; every
rank must then hold the same batch) and ``fsdp`` (``fsdp_size=ep_size=2``,
dense layers FSDP2-sharded; ranks may hold different batches).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A Mixtral-like checkpoint whose experts dominate its size: 8 experts of
# 3 x 512 x 2048 per layer, 4 layers: 403 MB of experts, 21 MB dense (fp32).
CHECKPOINT = dict(family="mixtral", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                  num_local_experts=8, num_attention_heads=8, num_key_value_heads=4)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss, not inherited
    from the parent across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def tokens(batch: int, seq: int, vocab: int, rank: int = 0):
    import torch

    return (torch.arange(batch * seq).view(batch, seq) * (7 + 2 * rank) + 3 + rank) % vocab


def load_transformers_ep(path: str, layout: str):
    import torch
    import transformers
    from transformers.distributed import DistributedConfig

    cfg = transformers.AutoConfig.from_pretrained(path)
    if layout == "tp":
        with torch.device("meta"):
            plan = transformers.AutoModelForCausalLM.from_config(cfg).tp_plan
        dc = DistributedConfig(tp_size=2, ep_size=2, tp_plan={k: "replicate" for k in plan})
    else:
        dc = DistributedConfig(fsdp_size=2, tp_size=1, ep_size=2)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=dc).eval()


def child_memory(system: str, path: str) -> dict:
    """One load in this process; its peak RSS before and after."""
    import torch
    import transformers

    import epmoe

    state = epmoe.init_distributed(force_cpu=True) if system.startswith("epmoe") else None
    # Import the model's modules first (about 150 MB of transformers code): the
    # baseline is everything but the weights.
    getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])
    before = peak_rss_mb()
    t0 = time.perf_counter()
    if system == "transformers_1proc":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif system.startswith("epmoe"):
        model = epmoe.from_pretrained(path, state, dtype="float32")
    else:
        model = load_transformers_ep(path, system.removeprefix("transformers_ep_"))
    seconds = time.perf_counter() - t0
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    del model
    return dict(system=system, rank=rank, rss_before_load_mb=round(before, 1),
                peak_rss_mb=round(peak_rss_mb(), 1), load_s=round(seconds, 2))


def child_time(path: str, reps: int, batch: int, seq: int) -> dict:
    """epmoe and transformers' EP side by side in this process, forwards interleaved.

    Each runs its own way: epmoe and the fsdp layout a different batch per rank
    (data-parallel attention), the tp layout one batch shared by every rank.
    """
    import torch
    import torch.distributed as dist
    import transformers

    import epmoe

    state = epmoe.init_distributed(force_cpu=True)
    rank, world = state.rank, state.world_size
    ours = epmoe.from_pretrained(path, state, dtype="float32")
    theirs = {layout: load_transformers_ep(path, layout) for layout in ("tp", "fsdp")}
    vocab = ours.config.vocab_size
    inputs = {"epmoe": tokens(batch, seq, vocab, rank), "fsdp": tokens(batch, seq, vocab, rank),
              "tp": tokens(batch, seq, vocab, 0)}
    distinct = {"epmoe": world * batch * seq, "fsdp": world * batch * seq, "tp": batch * seq}
    times: dict[str, list[float]] = {"epmoe": [], "tp": [], "fsdp": []}
    logits = {}
    with torch.no_grad(), ours.epmoe.session():
        for _ in range(reps + 1):  # the first round warms up and is dropped
            for name, model in [("epmoe", ours), *theirs.items()]:
                dist.barrier()
                t0 = time.perf_counter()
                out = model(inputs[name]).logits
                times[name].append(time.perf_counter() - t0)
                logits[name] = out.full_tensor() if hasattr(out, "full_tensor") else out
    single = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = {k: float((v - single(inputs[k]).logits).abs().max()) for k, v in logits.items()}
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    epmoe.destroy_distributed()
    return dict(rank=rank, threads=torch.get_num_threads(), batch=batch, seq=seq,
                median_s=median, distinct_tokens=distinct,
                tokens_per_s={k: distinct[k] / median[k] for k in median},
                max_abs_logit_diff=diff)


def run(nproc: int, args: list[str]) -> list[dict]:
    if nproc == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=29517", __file__, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not rows:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr[-4000:]}")
    return rows


def main(nproc: int = 2, reps: int = 15, batch: int = 4, seq: int = 64,
         out_dir: Path = HERE / "results") -> dict:
    from epmoe.hf.tiny import save_tiny_checkpoint

    path = Path("/tmp/epmoe-bench-mixtral")
    if not (path / "config.json").is_file():
        kw = {k: v for k, v in CHECKPOINT.items() if k != "family"}
        save_tiny_checkpoint(CHECKPOINT["family"], path, seed=0, tokenizer=False, **kw)
    size_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    memory = run(1, ["--child", "memory", "--system", "transformers_1proc", "--path", str(path)])
    memory += run(1, ["--child", "memory", "--system", "epmoe_ep1", "--path", str(path)])
    for n in (2, 4):
        memory += run(n, ["--child", "memory", "--system", f"epmoe_ep{n}", "--path", str(path)])
    for layout in ("tp", "fsdp"):
        memory += run(2, ["--child", "memory", "--system", f"transformers_ep_{layout}",
                          "--path", str(path)])
    timing = run(nproc, ["--child", "time", "--path", str(path), "--reps", str(reps),
                         "--batch", str(batch), "--seq", str(seq)])
    result = dict(date=datetime.date.today().isoformat(), checkpoint=CHECKPOINT, reps=reps,
                  checkpoint_mb=round(size_mb, 1), memory=memory, time=timing)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"hf_peer_{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"\nsaved {out}")
    return result


def table(r: dict) -> str:
    lines = [f"checkpoint: Mixtral-like, {r['checkpoint_mb']:.0f} MB fp32 safetensors",
             "", "| load | ranks | peak RSS per rank (MB) | before loading (MB) | "
             "added by loading (MB) |", "| --- | --- | --- | --- | --- |"]
    names = {"transformers_1proc": "transformers, one process", "epmoe_ep1": "epmoe EP=1",
             "epmoe_ep2": "epmoe EP=2", "epmoe_ep4": "epmoe EP=4",
             "transformers_ep_tp": "transformers EP=2 (tp layout)",
             "transformers_ep_fsdp": "transformers EP=2 (fsdp layout)"}
    for system, label in names.items():
        rows = [m for m in r["memory"] if m["system"] == system]
        if rows:
            rows.sort(key=lambda m: m["rank"])
            peaks = "/".join(f"{m['peak_rss_mb']:.0f}" for m in rows)
            before = "/".join(f"{m['rss_before_load_mb']:.0f}" for m in rows)
            added = "/".join(f"{m['peak_rss_mb'] - m['rss_before_load_mb']:.0f}" for m in rows)
            lines.append(f"| {label} | {len(rows)} | {peaks} | {before} | {added} |")
    t = r["time"][0]
    worst = {k: max(x["max_abs_logit_diff"][k] for x in r["time"]) for k in t["median_s"]}
    lines += ["", f"forward, {t['batch']} x {t['seq']} tokens per batch, {len(r['time'])} "
              f"ranks, {t['threads']} thread(s) each, median of {r.get('reps', '')} interleaved "
              "runs, rank 0:", "",
              "| model | batches | median forward (ms) | group tokens/s | tokens/s vs epmoe | "
              "max abs logit diff vs one process |", "| --- | --- | --- | --- | --- | --- |"]
    for name, label, batches in (
            ("epmoe", "epmoe EP=2", "one per rank"),
            ("tp", "transformers EP=2, tp layout", "one, shared"),
            ("fsdp", "transformers EP=2, fsdp layout", "one per rank")):
        ms = 1e3 * t["median_s"][name]
        tps = t["tokens_per_s"][name]
        lines.append(f"| {label} | {batches} | {ms:.1f} | {tps:.0f} | "
                     f"{tps / t['tokens_per_s']['epmoe']:.2f}x | {worst[name]:.2e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child == "memory":
        print(json.dumps(child_memory(a.system, a.path)), flush=True)
    elif a.child == "time":
        print(json.dumps(child_time(a.path, a.reps, a.batch, a.seq)), flush=True)
    else:
        main(a.nproc, a.reps, a.batch, a.seq)
