"""Quantized experts against bf16: memory of an expert stack and time of the expert compute.

The serving benchmark's expert shape (H=1024, F=2048, e=4 local experts), bf16
compute on one thread. Expert bytes of the bf16 stack, of FP8 block-scaled
(128x128 blocks, fp32 scales) and of MXFP4 (uint8 e8m0 scale per 32 values);
time of the local expert compute with M rows per expert: bf16 through
``local_experts_forward`` (``"loop"``, and ``"auto_rows"`` as the layer picks on
the CPU) and the quantized stacks through ``quantized_experts_forward`` (one
dequantization per expert per forward). Medians of interleaved repetitions, each
variant's ratio to bf16 loop in the same run. Prints and writes
``benchmarks/results/quant.json``.

    python benchmarks/quant.py            # (--reps 9)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights, gated_activation, local_experts_forward
from epmoe.experts_quant import quantized_experts_forward
from epmoe.quant import QuantFormat, QuantizedExperts, quantize_fp8_blocks, quantize_mxfp4

RESULTS = Path(__file__).parent / "results" / "quant.json"


def _stacks(e: int, H: int, Fi: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    w_gu = torch.randn(e, 2 * Fi, H, generator=gen) * H ** -0.5
    w_d = torch.randn(e, H, Fi, generator=gen) * Fi ** -0.5
    fp8 = QuantizedExperts.empty(QuantFormat("fp8", (128, 128)), e, H, Fi)
    mx = QuantizedExperts.empty(QuantFormat("mxfp4", (1, 32)), e, H, Fi)
    for i in range(e):
        fp8.load_fp8(i, gate=quantize_fp8_blocks(w_gu[i, :Fi], (128, 128)),
                     up=quantize_fp8_blocks(w_gu[i, Fi:], (128, 128)),
                     down=quantize_fp8_blocks(w_d[i], (128, 128)))
        interleaved = torch.stack([w_gu[i, :Fi], w_gu[i, Fi:]], dim=1).flatten(0, 1)
        mx.load_mxfp4(i, quantize_mxfp4(interleaved), quantize_mxfp4(w_d[i]))
    bf16 = ExpertWeights(w_gu.bfloat16(), w_d.bfloat16())
    return {"bf16": bf16, "fp8": fp8, "mxfp4": mx}


def main(hidden: int = 1024, inter: int = 2048, experts: int = 4,
         rows: tuple[int, ...] = (8, 64, 2048), reps: int = 9) -> dict:
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    stacks = _stacks(experts, hidden, inter)
    glu = gated_activation(MoEConfig(num_experts=experts, hidden_size=hidden,
                                     intermediate_size=inter))
    bf16_bytes = sum(t.numel() * t.element_size() for t in stacks["bf16"][:2])
    out = {"shape": dict(H=hidden, F=inter, e=experts, dtype="bfloat16", threads=1),
           "load_average_1min": load,
           "bytes": {"bf16": bf16_bytes, "fp8": stacks["fp8"].nbytes(),
                     "mxfp4": stacks["mxfp4"].nbytes()},
           "ms": {}, "ratio_to_bf16_loop": {}}
    print(f"load average {load:.2f}" + ("  (ABOVE 1.5: timings disturbed)" if load > 1.5 else ""))
    for k, b in out["bytes"].items():
        print(f"{k:6s} expert bytes {b:>11,d}  {b / bf16_bytes:.3f} of bf16")
    variants = {
        "bf16_loop": lambda a: local_experts_forward(*a, stacks["bf16"], glu, "loop"),
        "bf16_auto": lambda a: local_experts_forward(*a, stacks["bf16"], glu, "auto_rows"),
        "fp8": lambda a: quantized_experts_forward(*a, stacks["fp8"], glu),
        "mxfp4": lambda a: quantized_experts_forward(*a, stacks["mxfp4"], glu),
    }
    for M in rows:
        gen = torch.Generator().manual_seed(M)
        x = torch.randn(experts * M, hidden, generator=gen).bfloat16()
        ids = torch.arange(experts).repeat_interleave(M).unsqueeze(1)  # M rows per expert
        args = (x, ids, torch.rand(experts * M, 1, generator=gen))
        times: dict[str, list[float]] = {v: [] for v in variants}
        with torch.no_grad():
            for fn in variants.values():  # warm-up
                fn(args)
            for _ in range(reps if M < 1024 else max(3, reps // 3)):
                for name, fn in variants.items():  # interleaved: drift hits all alike
                    t0 = time.perf_counter()
                    fn(args)
                    times[name].append((time.perf_counter() - t0) * 1e3)
        med = {v: statistics.median(t) for v, t in times.items()}
        out["ms"][M] = med
        out["ratio_to_bf16_loop"][M] = {v: med[v] / med["bf16_loop"] for v in med}
        print(f"M={M:5d} rows/expert: " + "  ".join(
            f"{v} {med[v]:8.2f} ms ({med[v] / med['bf16_loop']:.2f}x)" for v in med))
    out["load_average_1min_after"] = os.getloadavg()[0]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--rows", type=int, nargs="+", default=[8, 64, 2048])
    a = p.parse_args()
    main(rows=tuple(a.rows), reps=a.reps)
