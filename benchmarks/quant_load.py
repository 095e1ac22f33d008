"""An FP8 checkpoint against its bf16 original, expert-parallel: load time, expert bytes and
resident memory per rank, and the MoE layers' time.

    python benchmarks/serving_model.py      # the bf16 checkpoint, once (benchmarks/.serving_model)
    python benchmarks/quant_load.py         # its FP8 twin, then 3 interleaved rounds on 2 ranks

The model is the serving benchmark's (4-layer Qwen3-MoE, hidden 1024, 8 experts of
F=2048, bf16). Its FP8 twin is written here in DeepSeek's layout (every linear weight
but the routers and lm_head in float8_e4m3fn, 128 x 128 blocks, fp32
``weight_scale_inv``), as Qwen3-FP8 is released. Each round starts, for each format,
a fresh pair of processes under torchrun (EP=2, one thread each) that time
``epmoe.from_pretrained`` (bf16 compute either way), read their expert bytes and
resident set, then time every MoE layer's forward on T tokens per rank (T = 16, a
decode step of 16 sequences; T = 512, a prefill chunk): median over repetitions, the
slower rank. Ratios FP8 / bf16 per round, then their median. Prints and writes
``benchmarks/results/quant_load.json``; ``benchmarks/quant_report.py`` writes QUANT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BF16 = HERE / ".serving_model"
FP8 = HERE / ".serving_model_fp8"
RESULTS = HERE / "results" / "quant_load.json"
TOKENS = (16, 512)


def write_fp8(src: Path = BF16, out: Path = FP8, block: tuple[int, int] = (128, 128)) -> Path:
    """``src``'s FP8 twin: every 2-D ``.weight`` but embeddings, norms, routers and
    lm_head quantized in blocks, its scales beside it (transformers' FP8 layout)."""
    import re

    import torch
    from safetensors.torch import load_file, save_file

    from epmoe.quant import fp8_scale_name, quantize_fp8_blocks

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json" \
                and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    keep = re.compile(r"(embed_tokens|norm|lm_head|mlp\.gate\.weight)")
    weight_map = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors = {}
        for name, t in load_file(str(f)).items():
            if name.endswith(".weight") and t.ndim == 2 and not keep.search(name):
                tensors[name], tensors[fp8_scale_name(name)] = quantize_fp8_blocks(
                    t.to(torch.bfloat16), block)
            else:
                tensors[name] = t
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f.name))
    if (src / "model.safetensors.index.json").is_file():
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "fmt": "e4m3", "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def worker(model_dir: str, reps: int) -> None:
    """One rank: load, measure, and (rank 0) print one JSON line of the slower rank's
    figures."""
    import torch

    import epmoe
    from epmoe.collectives import gather_objects
    from epmoe.hf import from_pretrained

    torch.set_num_threads(1)
    state = epmoe.init_distributed(force_cpu=True, timeout_s=600)
    t0 = time.perf_counter()
    model = from_pretrained(model_dir, state, dtype="bfloat16")
    load_s = time.perf_counter() - t0
    layers = model.epmoe.layers
    # Resident memory of what the process holds: the loader's freed buffers handed back to
    # the system first (glibc keeps freed heap otherwise, and the resident set with it).
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_mb = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    mine = dict(load_s=load_s, rss_mb=rss_mb,
                expert_bytes=sum(m.expert_weight_bytes() for m in layers))
    H = layers[0].config.hidden_size
    gen = torch.Generator().manual_seed(state.rank)
    for T in TOKENS:
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
        times = []
        with torch.no_grad():
            for _ in range(reps + 1):  # (the first warms up)
                t = time.perf_counter()
                for layer in layers:
                    layer(x)
                times.append(time.perf_counter() - t)
        mine[f"layers_ms_T{T}"] = 1e3 * statistics.median(times[1:])
    every = gather_objects(mine, torch.distributed.group.WORLD)
    if state.rank == 0:
        slowest = {k: max(r[k] for r in every) for k in mine}
        slowest["expert_bytes"] = max(r["expert_bytes"] for r in every)
        print("RESULT " + json.dumps(slowest), flush=True)
    epmoe.destroy_distributed()


def _run(model_dir: Path, reps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(Path(__file__).resolve()), "--worker", str(model_dir), "--reps", str(reps)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{model_dir}: exit {p.returncode}\n{p.stdout[-2000:]}\n"
                           f"{p.stderr[-2000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main(rounds: int = 3, reps: int = 5) -> dict:
    if not (BF16 / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "serving_model.py")], check=True)
    if not (FP8 / "config.json").is_file():
        write_fp8()
    runs: dict[str, list[dict]] = {"bf16": [], "fp8": []}
    for r in range(rounds):  # interleaved: bf16, fp8, bf16, fp8, ...
        for name, path in (("bf16", BF16), ("fp8", FP8)):
            runs[name].append(_run(path, reps))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    keys = list(runs["bf16"][0])
    out = {"model": "benchmarks/.serving_model (4 layers, H=1024, 8 experts, F=2048), EP=2, "
                    "bf16 compute, 1 thread per rank",
           "load_average_1min": os.getloadavg()[0], "rounds": runs,
           "median": {n: {k: statistics.median(x[k] for x in runs[n]) for k in keys}
                      for n in runs},
           "ratio_fp8_to_bf16": {k: statistics.median(f[k] / b[k] for f, b in
                                                      zip(runs["fp8"], runs["bf16"], strict=True))
                                 for k in keys}}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(json.dumps({"median": out["median"], "ratio": out["ratio_fp8_to_bf16"]}, indent=2))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.reps)
    else:
        main(a.rounds, a.reps)
