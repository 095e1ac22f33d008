"""Write ``benchmarks/QUANT.md`` from the newest results of ``quant.py`` and ``quant_load.py``.

    python benchmarks/quant.py && python benchmarks/quant_load.py && python benchmarks/quant_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYER = HERE / "results" / "quant.json"
LOAD = HERE / "results" / "quant_load.json"
OUT = HERE / "QUANT.md"


def report() -> str:
    layer, load = json.loads(LAYER.read_text()), json.loads(LOAD.read_text())
    s = layer["shape"]
    b = layer["bytes"]
    lines = [
        "# Quantized experts: FP8 and MXFP4 against bf16",
        "",
        "Each rank keeps its experts as the checkpoint stores them and dequantizes one "
        "expert at a time when it computes (`epmoe/experts_quant.py`); replicated weights "
        "are dequantized at load. Figures from this machine (2 cores, AMD EPYC), bf16 "
        "compute; the commands are at the end.",
        "",
        "## Expert compute",
        "",
        f"`python benchmarks/quant.py`: {s['e']} local experts of H={s['H']}, F={s['F']} "
        f"({s['dtype']} compute, {s['threads']} thread), M rows per expert, medians of "
        "interleaved repetitions; each ratio is to bf16's loop in the same run. 1-minute "
        f"load average {layer['load_average_1min']:.2f} before, "
        f"{layer['load_average_1min_after']:.2f} after.",
        "",
        "| | bytes | ratio to bf16 |",
        "| --- | ---: | ---: |",
    ]
    for name in ("bf16", "fp8", "mxfp4"):
        lines.append(f"| {name} | {b[name]:,} | {b[name] / b['bf16']:.4f} |")
    lines += ["", "| M rows per expert | bf16 (ms) | FP8 (ms, ratio) | MXFP4 (ms, ratio) |",
              "| ---: | ---: | ---: | ---: |"]
    for m, ms in layer["ms"].items():
        r = layer["ratio_to_bf16_loop"][m]
        lines.append(f"| {m} | {ms['bf16_loop']:.1f} | {ms['fp8']:.1f} ({r['fp8']:.2f}x) | "
                     f"{ms['mxfp4']:.1f} ({r['mxfp4']:.2f}x) |")
    med, ratio = load["median"], load["ratio_fp8_to_bf16"]
    lines += [
        "",
        "## A whole checkpoint, expert-parallel",
        "",
        f"`python benchmarks/quant_load.py`: {load['model']}. The FP8 twin is the same "
        "weights quantized in DeepSeek's layout (128 x 128 blocks). Each format loaded by a "
        f"fresh pair of processes per round, {len(load['rounds']['bf16'])} interleaved rounds;"
        " the slower rank's figure, medians; ratio: FP8 / bf16 per round, then the median."
        f" 1-minute load average at the end {load['load_average_1min']:.2f}.",
        "",
        "| per rank | bf16 | FP8 | FP8 / bf16 |",
        "| --- | ---: | ---: | ---: |",
        f"| expert bytes | {med['bf16']['expert_bytes']:,.0f} | {med['fp8']['expert_bytes']:,.0f}"
        f" | {ratio['expert_bytes']:.4f} |",
        f"| resident memory after load (MB) | {med['bf16']['rss_mb']:.0f} | "
        f"{med['fp8']['rss_mb']:.0f} | {ratio['rss_mb']:.2f} |",
        f"| `from_pretrained` (s) | {med['bf16']['load_s']:.2f} | {med['fp8']['load_s']:.2f} | "
        f"{ratio['load_s']:.2f} |",
    ]
    for key in sorted(k for k in med["bf16"] if k.startswith("layers_ms_T")):
        T = key.removeprefix("layers_ms_T")
        lines.append(f"| 4 MoE layers, {T} tokens per rank (ms) | {med['bf16'][key]:.1f} | "
                     f"{med['fp8'][key]:.1f} | {ratio[key]:.2f} |")
    lines += [
        "",
        "## What it says",
        "",
        "- Memory: the experts take half their bf16 bytes in FP8 (plus one fp32 scale per "
        "128 x 128 block) and about a quarter in MXFP4 (plus one byte per 32 weights).",
        "- Time: dequantizing is the price, paid per expert that receives a row, per "
        "forward. With few rows per expert (a decode step) it dominates: the ratios at "
        "M = 8 and at 16 tokens per rank above. With thousands of rows per expert the "
        "products dominate and the ratio nears 1 (M = 2048). A fused "
        "dequantize-and-multiply kernel would remove most of it; torch has none for these "
        "formats on the CPU.",
        "- Loading takes about as long: the FP8 files are half the bytes to read, and the "
        "replicated weights are dequantized on the way in.",
        "",
        "## Commands",
        "",
        "```bash",
        "python benchmarks/quant.py          # expert compute and bytes",
        "python benchmarks/serving_model.py  # the bf16 checkpoint, once",
        "python benchmarks/quant_load.py     # its FP8 twin, load and layers on 2 ranks",
        "python benchmarks/quant_report.py   # this file",
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(report())
    print(OUT.read_text())
