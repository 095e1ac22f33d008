"""EP beside TP for the presets of ``epmoe bench``: the seed's comparison table, measured.

    torchrun --nproc_per_node=2 benchmarks/ep_vs_tp.py [--reps 9]   # writes EP_VS_TP.md

The Mixtral-like (8 experts of F=2048, top-2) and DeepSeek-like (64 experts of
F=256, top-6, a shared expert) layers, bf16, 2048 tokens per rank (prefill) and 8
(decode), one thread per rank, through ``epmoe.tp_compare.compare``: EP
(alltoall), TP with each rank's own tokens (all-gather, reduce-scatter) and TP
with the same tokens on every rank (one all-reduce). Rank 0 writes
``benchmarks/EP_VS_TP.md`` and ``benchmarks/results/ep_vs_tp_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

import epmoe
from epmoe.benchmark import PRESETS
from epmoe.tp_compare import compare, markdown_table, text_table

HERE = Path(__file__).resolve().parent


def main(reps: int, prefill: int, decode: int) -> None:
    torch.set_num_threads(1)
    state = epmoe.init_distributed(force_cpu=True, timeout_s=600)
    sizes = {f"prefill {prefill}/rank": prefill, f"decode {decode}/rank": decode}
    day = datetime.date.today().isoformat()
    raw, md = {}, []
    for preset in ("mixtral", "deepseek"):
        cfg = epmoe.MoEConfig(**PRESETS[preset], dtype="bfloat16")
        results = compare(state, cfg, sizes, reps=reps)
        raw[preset] = results
        if state.rank == 0:
            print(f"\n{preset}-like, bf16, {state.ep_size} ranks:\n{text_table(results, sizes)}",
                  flush=True)
            c = PRESETS[preset]
            shape = (f"H={c['hidden_size']}, {c['num_experts']} experts of F="
                     f"{c['intermediate_size']}, top-{c['top_k']}"
                     + (f", a shared expert of F={c['shared_intermediate_size']}"
                        if c.get("shared_intermediate_size") else ""))
            md += ["", f"### {preset.capitalize()}-like ({shape})", "",
                   markdown_table(results, sizes)]
    if state.rank == 0:
        (HERE / "results" / f"ep_vs_tp_{day}.json").write_text(json.dumps(raw, indent=1) + "\n")
        head = [
            "# Expert parallelism beside tensor parallelism, measured", "",
            f"Made by `torchrun --nproc_per_node={state.ep_size} benchmarks/ep_vs_tp.py "
            f"--reps {reps}` on {day} ({state.ep_size} ranks of one thread, gloo on this "
            "machine's 2 CPU cores, bf16; raw figures in "
            f"`benchmarks/results/ep_vs_tp_{day}.json`). See `epmoe/tp_compare.py` for what "
            "is measured. Bytes: tokens, routing and results a rank sends (headers aside). "
            "Times: median of interleaved forwards, the slower rank. Error: max abs against "
            "`reference_moe` in bf16 on the whole batch, and the verdict of "
            "`compare_to_reference`, the tolerance the tests use. TP, replicated: every rank "
            "passes the whole batch (the "
            "group's tokens), as in Megatron's TP, where the activations are the same on "
            "every rank. TP's reduce-scatter runs as an all-to-all and a local sum (gloo has "
            "no uneven reduce-scatter).",
        ]
        (HERE / "EP_VS_TP.md").write_text("\n".join(head + md) + "\n")
        print(f"wrote {HERE / 'EP_VS_TP.md'}")
    epmoe.destroy_distributed(state)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--prefill", type=int, default=2048, help="tokens per rank, prefill")
    p.add_argument("--decode", type=int, default=8, help="tokens per rank, decode")
    a = p.parse_args()
    main(a.reps, a.prefill, a.decode)
