"""Run every benchmark and write ``benchmarks/RESULTS.md`` (and the raw JSON, and a PNG).

    python benchmarks/run_all.py            # about 30 minutes on 2 cores
    python benchmarks/run_all.py --quick    # fewer repetitions and cases, for a smoke run
    python benchmarks/run_all.py --rebuild benchmarks/results/all_<date>.json
    python benchmarks/run_all.py --report benchmarks/results/all_<date>.json \
        --fwd-bwd benchmarks/results/fwd_bwd.json [more runs]  # from saved results only

Needs the ``bench`` extra (transformers' EP needs accelerate) and, for the
torchtitan peer, ``pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3
triton==3.9.0 tyro docstring-parser typeguard`` (it is skipped, with the
reason, without them). Each part runs in fresh processes: 2 ranks of 1 thread
each (torchrun's default) unless said otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def sh(cmd: list[str], timeout: int = 3600) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p.stdout


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--standalone", *args]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "torchtitan", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "not installed"
    return out


def machine() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in
                     Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU"


def main(quick: bool = False) -> None:
    RESULTS.mkdir(exist_ok=True)
    day = datetime.date.today().isoformat()
    reps = "5" if quick else "15"
    raw: dict = {"date": day, "machine": machine(), "versions": versions()}

    f = RESULTS / f"expert_impl_{day}.json"
    sh([sys.executable, "benchmarks/expert_impl.py", "--reps", "5" if quick else "11",
        "--json", str(f)])
    raw["expert_impl"] = json.loads(f.read_text())

    f = RESULTS / f"compare_{day}.json"
    sh(torchrun("benchmarks/compare.py", "--reps", reps, "--json", str(f)))
    raw["compare"] = json.loads(f.read_text())

    f = RESULTS / f"fwd_bwd_{day}.json"
    sh(torchrun("benchmarks/fwd_bwd.py", "--reps", reps, "--json", str(f)))
    raw["fwd_bwd"] = json.loads(f.read_text())

    f, png = RESULTS / f"bench_{day}.json", RESULTS / f"bench_{day}.png"
    sweep = ["--reps", "3" if quick else "5"]
    if quick:
        sweep += ["--tokens", "2048", "--tokens", "8"]
    sh(torchrun("-m", "epmoe", "bench", *sweep, "--json", str(f), "--plot", str(png),
                "--force-cpu"), timeout=7200)
    raw["bench"] = json.loads(f.read_text())

    raw["low_precision"] = []
    for dtype, codecs in (("bfloat16", ["float8_e4m3"]), ("float32", ["bfloat16", "float8_e4m3"])):
        for codec in [None, *codecs]:
            f = RESULTS / f"lowp_{dtype}_{codec}_{day}.json"
            extra = ["--dispatch-dtype", codec] if codec else []
            sh(torchrun("-m", "epmoe", "bench", "--preset", "mixtral", "--mode", "prefill",
                        "--tokens", "2048", "--dtype", dtype, "--backend", "alltoall",
                        "--reps", "3" if quick else "7", *extra, "--json", str(f),
                        "--force-cpu"))
            raw["low_precision"] += json.loads(f.read_text())["results"]
            f.unlink()

    raw["profile"] = profile(day)
    if not quick:
        sh([sys.executable, "benchmarks/hf_peer.py", "--reps", "15"])
        raw["hf_peer"] = json.loads((RESULTS / f"hf_peer_{day}.json").read_text())
        out = sh(torchrun("benchmarks/shared_overlap.py", "--reps", "31"))
        out += sh(torchrun("benchmarks/shared_overlap.py", "--reps", "31", "--tokens", "256"))
        raw["shared_overlap"] = out
        sh([sys.executable, "benchmarks/eplb_balance.py", "--report"])  # writes EPLB.md
    (RESULTS / f"all_{day}.json").write_text(json.dumps(raw, indent=1) + "\n")
    (HERE / "RESULTS.md").write_text(report(raw, png.name))
    print(f"wrote {HERE / 'RESULTS.md'}")


def profile(day: str) -> list[dict]:
    out = []
    for tokens, backend, nproc in ((2048, "alltoall", 1), (2048, "alltoall", 2),
                                   (8, "low_latency", 2)):
        f = RESULTS / f"profile_{backend}_{tokens}_{day}.json"
        sh(torchrun("benchmarks/profile_layer.py", "--tokens", str(tokens), "--backend", backend,
                    "--reps", "20" if tokens < 100 else "8", "--json", str(f), nproc=nproc))
        out.append({**json.loads(f.read_text()), "nproc": nproc})
        f.unlink()
    return out


def rebuild(raw_json: str) -> None:
    """The report again from a run's raw figures, with a fresh profile."""
    raw = json.loads(Path(raw_json).read_text())
    raw["profile"] = profile(raw["date"])
    Path(raw_json).write_text(json.dumps(raw, indent=1) + "\n")
    (HERE / "RESULTS.md").write_text(report(raw, f"bench_{raw['date']}.png"))
    print(f"wrote {HERE / 'RESULTS.md'}")


def report_only(raw_json: str, fwd_bwd_json: list[str] | None) -> None:
    """RESULTS.md again from saved results, running nothing (``--rebuild`` reruns the
    profile): a run's raw figures, and ``benchmarks/fwd_bwd.py``'s results where the raw
    file has none or others are named (the first reported in full, the others as repeats:
    their ratios only). The saved files are left as they are."""
    raw = json.loads(Path(raw_json).read_text())
    if fwd_bwd_json:
        first, *repeats = fwd_bwd_json
        raw["fwd_bwd"] = json.loads(Path(first).read_text())
        raw["fwd_bwd_source"] = Path(first).name
        raw["fwd_bwd_repeats"] = {Path(f).name: json.loads(Path(f).read_text())
                                  for f in repeats}
    (HERE / "RESULTS.md").write_text(report(raw, f"bench_{raw['date']}.png"))
    print(f"wrote {HERE / 'RESULTS.md'}")


# --------------------------------------------------------------------------- report


def profile_tables(raw: dict) -> list[str]:
    out = ["", "## Where the time goes (`benchmarks/profile_layer.py`, torch.profiler)", "",
           "Self time of every operator of a forward, summed by kind of work, per rank; "
           "\"outside any operator\" is the wall time left: waiting for the peer's rows (its "
           "transfer and its own slower work) and Python.", ""]
    for p in raw.get("profile", []):
        for r in p["ranks"]:
            out.append(f"- {p['backend']}, {p.get('nproc', 2)} rank(s), {p['tokens']} tokens "
                       f"per rank, rank {r['rank']} "
                       f"({r['ms_per_forward']:.1f} ms per forward under the profiler): "
                       + "; ".join(f"{k} {100 * v:.1f}%" for k, v in r["shares"].items()))
    solo = [p["ranks"][0]["shares"] for p in raw.get("profile", []) if p.get("nproc") == 1]
    act = [100 * r["shares"].get("activation (silu, mul)", 0.0) for p in raw.get("profile", [])
           if p["tokens"] == 2048 for r in p["ranks"]]
    mlp = [r["loop"] / r["floor"] for r in raw["expert_impl"] if r["shape"] == "mixtral prefill"]
    cmp = {r["tokens_per_rank"]: r for r in raw["compare"]}
    peers = [v for n, v in cmp.get(2048, {}).get("ms", {}).items() if " EP" in n]
    if act and mlp and peers:
        mm = 100 * solo[0].get("matrix products", 0.0) if solo else float("nan")
        out += ["", "What bounds the prefill targets: on one process, with no peer to wait "
                f"for, the matrix products are {mm:.1f}% of the forward; the rest is the "
                "activation (one elementwise pass over the [rows, 2F] gate/up output: silu and "
                f"a product, {min(act):.1f}-{max(act):.1f}% of a prefill forward above), the "
                "weighted row sums, the gathers, and routing. On 2 ranks add the time a rank "
                "spends outside any operator, waiting for the other's rows: their transfer "
                "(gloo copies through loopback sockets on the same 2 cores) and the other "
                "rank's slower work (this machine's two cores run at different speeds from "
                "minute to minute; the profiler itself adds to both). transformers' and "
                "torchtitan's EP run the same matrix products, so nothing can beat the fastest "
                "of them by more than its distance to the floor "
                f"({min(peers) / cmp[2048]['floor_ms']:.2f}x in the table above) without "
                "faster matrix products. (`benchmarks/expert_impl.py` timed whole expert MLPs "
                f"at {'/'.join(f'{m:.2f}' for m in mlp)}x the products alone, bf16 and fp32.)"]
    return out



def _ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def targets(raw: dict) -> list[str]:
    cmp = {r["tokens_per_rank"]: r for r in raw["compare"]}
    rows = ["| target | measured | met |", "| --- | --- | --- |"]

    def best(ms: dict, prefix: str) -> tuple[str, float]:
        return min(((n, v) for n, v in ms.items() if n.startswith(prefix)), key=lambda t: t[1])

    if 2048 in cmp:
        ms = cmp[2048]["ms"]
        name, ours = best(ms, "epmoe")
        eff = cmp[2048]["floor_ms"] / ours
        rows.append(f"| prefill 2048/rank: efficiency >= 0.9 | {eff:.2f} ({name}: "
                    f"{_ms(ours)} ms, floor {_ms(cmp[2048]['floor_ms'])} ms) | "
                    f"{'yes' if eff >= 0.9 else 'no'} |")
        for peer, goal in (("transformers EP", 1.5), ("torchtitan EP", 1.3)):
            if any(n.startswith(peer) for n in ms):
                pn, pv = best(ms, peer)
                rows.append(f"| prefill: >= {goal}x faster than {peer} | {pv / ours:.2f}x "
                            f"({pn} {_ms(pv)} ms) | {'yes' if pv / ours >= goal else 'no'} |")
    if 8 in cmp:
        ms = cmp[8]["ms"]
        name, ours = best(ms, "epmoe")
        for peer in ("transformers EP", "torchtitan EP"):
            if any(n.startswith(peer) for n in ms):
                pn, pv = best(ms, peer)
                met = "yes" if ours < pv else "no"
                rows.append(f"| decode 8/rank: faster than {peer} | {pv / ours:.2f}x ({name} "
                            f"{_ms(ours)} ms, {pn} {_ms(pv)} ms) | {met} |")
        bound = cmp[8]["floor_ms"] + 2 * ms["empty all-to-all"]
        rows.append(f"| decode: within 1.2x of floor + 2 empty all-to-alls | {ours / bound:.2f}x "
                    f"({_ms(ours)} ms against {_ms(bound)} ms) | "
                    f"{'yes' if ours <= 1.2 * bound else 'no'} |")
    fb = {r["tokens_per_rank"]: r for r in raw.get("fwd_bwd", [])}
    if 2048 in fb:
        ms = fb[2048]["fwd_bwd_ms"]
        name, ours = best(ms, "epmoe")
        parts, ratios = [], []
        for peer in ("transformers EP", "torchtitan EP"):
            if any(n.startswith(peer) for n in ms):
                pn, pv = best(ms, peer)
                ratios.append(pv / ours)
                parts.append(f"{pv / ours:.2f}x ({pn} {_ms(pv)} ms)")
            else:
                parts.append(f"{peer} not timed (see its section)")
        met = "n/a" if len(ratios) < 2 else "yes" if min(ratios) >= 1.3 else "no"
        rows.append(f"| fwd+bwd 2048/rank: >= 1.3x faster than transformers EP and torchtitan "
                    f"EP | {', '.join(parts)} against {name} {_ms(ours)} ms | {met} |")
    lowp = [r for r in raw["low_precision"] if r["dtype"] == "bfloat16"]
    exact = next((r for r in lowp if r["dispatch_dtype"] is None), None)
    fp8 = next((r for r in lowp if r["dispatch_dtype"] == "float8_e4m3"), None)
    if exact:
        ratio = exact["remote_token_bytes"] / exact["min_token_bytes"]
        rows.append(f"| alltoall token bytes = the exact minimum | {ratio:.3f} of it | "
                    f"{'yes' if ratio == 1 else 'no'} |")
    if exact and fp8:
        half = fp8["remote_token_bytes"] / exact["min_token_bytes"]
        rows.append(f"| fp8 dispatch: half of it | {half:.3f} of it (the 4-byte scale per "
                    f"token) | {'yes' if half <= 0.51 else 'no'} |")
    return rows


def compare_tables(raw: dict) -> list[str]:
    out = []
    for r in raw["compare"]:
        ms = r["ms"]
        ours = min(v for n, v in ms.items() if n.startswith("epmoe"))
        out += ["", f"**{r['tokens_per_rank']} tokens per rank** (each contender checked "
                "against the fp32 reference first; times: median ms of the slower rank)", "",
                "| contender | ms | relative to the fastest epmoe |", "| --- | --- | --- |"]
        for n, v in sorted(ms.items(), key=lambda kv: kv[1]):
            out.append(f"| {n} | {_ms(v)} | {v / ours:.2f}x |")
        for n, why in r["notes"].items():
            out.append(f"| {n} | not run: {why} | |")
        for n, ok in r["passed"].items():
            if not ok:
                out.append(f"| {n} | failed its check: {r['checks'][n]} | |")
    return out


def fwd_bwd_tables(raw: dict) -> list[str]:
    if "fwd_bwd" not in raw:
        return []
    sys.path.insert(0, str(HERE))
    from fwd_bwd import check_table

    source = raw.get("fwd_bwd_source", f"fwd_bwd_{raw['date']}.json")
    out = ["", "## Forward and backward (training), Mixtral-like, bf16", "",
           "`torchrun --nproc_per_node=2 benchmarks/fwd_bwd.py` (figures: "
           f"`results/{source}`). Each rank its own tokens; the router, the experts and "
           "the input require gradients. fwd+bwd: the forward, then `y.backward(grad_y)` "
           "with a fixed random `grad_y`, gradients set to None before each (untimed); "
           "fwd: the same forward alone, in grad mode (it records the graph); bwd / fwd = "
           "(fwd+bwd - fwd) / fwd. The floor: the expert matrix products alone on the rows "
           "per expert epmoe routed, forward (gate/up and down) and backward (the input and "
           "weight gradient of each, 4 more products of the same sizes), as a loop or as "
           "grouped_mm (backward by autograd). Before timing, every contender's output and "
           "gradients (input, router summed over the ranks, local experts) are checked "
           "against the fp32 reference (tables below the times)."]
    for r in raw["fwd_bwd"]:
        fwd, fb = r["fwd_ms"], r["fwd_bwd_ms"]
        ours = min(v for n, v in fb.items() if n.startswith("epmoe"))
        out += ["", f"**{r['tokens_per_rank']} tokens per rank** (times: median ms of the "
                "slower rank)", "",
                "| contender | fwd ms | fwd+bwd ms | bwd / fwd | fwd+bwd relative to the "
                "fastest epmoe |", "| --- | --- | --- | --- | --- |"]
        for n, v in sorted(fb.items(), key=lambda kv: kv[1]):
            out.append(f"| {n} | {_ms(fwd[n])} | {_ms(v)} | {(v - fwd[n]) / fwd[n]:.2f} | "
                       f"{v / ours:.2f}x |")
        for n, why in r["notes"].items():
            out.append(f"| {n} | not run: {why} | | | |")
        for n, ok in r["passed"].items():
            if not ok:
                out.append(f"| {n} | failed its check, not timed | | | |")
        for name, rep in raw.get("fwd_bwd_repeats", {}).items():
            again = next((q for q in rep if q["tokens_per_rank"] == r["tokens_per_rank"]), None)
            if again is None:
                continue
            fb2 = again["fwd_bwd_ms"]
            best2 = min(v for n, v in fb2.items() if n.startswith("epmoe"))
            out += ["", f"Repeat run (`results/{name}`), fwd+bwd relative to the fastest epmoe: "
                    + ", ".join(f"{n} {v / best2:.2f}x ({_ms(v)} ms)"
                                for n, v in sorted(fb2.items(), key=lambda kv: kv[1])) + "."]
        out += [""] + check_table(r).lstrip("\n").split("\n")
    return out


def bench_table(raw: dict) -> list[str]:
    out = ["| preset | mode | tokens/rank | dtype | backend | tokens/s | layer ms | floor ms | "
           "efficiency | token bytes / minimum | imbalance |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in raw["bench"]["results"]:
        ratio = r["remote_token_bytes"] / r["min_token_bytes"] if r["min_token_bytes"] else 1
        out.append(f"| {r['preset']} | {r['mode']} | {r['tokens_per_rank']} | {r['dtype']} | "
                   f"{r['backend']} | {r['tokens_per_s']:.0f} | {_ms(r['layer_ms'])} | "
                   f"{_ms(r['floor_ms'])} | {r['efficiency']:.2f} | {ratio:.2f} | "
                   f"{r['imbalance']:.2f} |")
    return out


def report(raw: dict, png: str) -> str:
    v = raw["versions"]
    lines = [
        "# Benchmark results", "",
        f"Generated by `python benchmarks/run_all.py` on {raw['date']}: {raw['machine']}; "
        f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"torchtitan {v['torchtitan']}, accelerate {v['accelerate']}; gloo. "
        "Unless said otherwise: 2 ranks of 1 thread each.",
        "",
        "The machine is shared and noisy (the same matrix product took 8 ms in one minute "
        "and 21 ms in another): every figure is a median of interleaved runs, and only "
        "ratios measured in the same run are compared. The floor is the expert matrix "
        "products alone (gate/up and down, no activation) on the same rows per expert, "
        "whichever of a loop and grouped_mm is faster; efficiency = floor / layer time.",
        "", "Load balancing (redundant experts, rebalancing, `batch_invariant`) has its own "
        "report: [EPLB.md](EPLB.md), written by `benchmarks/eplb_balance.py --report`.",
        "", "## Targets (Mixtral-like, bf16)", "", *targets(raw),
        "", "## Beside the peers (Mixtral-like, bf16, `benchmarks/compare.py`)",
        *compare_tables(raw), *fwd_bwd_tables(raw), *profile_tables(raw),
        "", "## Expert implementations (`benchmarks/expert_impl.py`, one thread)", "",
        "| dtype | shape | loop ms | grouped_mm ms | products alone ms | faster |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {r['dtype']} | {r['shape']} | {_ms(r['loop'])} | {_ms(r['grouped_mm'])} | "
          f"{_ms(r['floor'])} | {r['best']} |" for r in raw["expert_impl"]],
        "", "`expert_impl=\"auto\"` on the CPU takes the loop from 512 rows per local expert on "
        "average and grouped_mm below (`epmoe.experts.choose_expert_impl`).",
        "", "## Low-precision dispatch (Mixtral-like, prefill 2048/rank, alltoall)", "",
        "| model dtype | tokens travel as | token bytes / exact minimum (model dtype) | "
        "max error / max output | layer ms |", "| --- | --- | --- | --- | --- |",
        *[f"| {r['dtype']} | {r['dispatch_dtype'] or r['dtype']} | "
          f"{r['remote_token_bytes'] / r['min_token_bytes']:.3f} | "
          f"{r['dispatch_error'] if r['dispatch_error'] is not None else 0:.2g} | "
          f"{_ms(r['layer_ms'])} |" for r in raw["low_precision"]],
        "", "## Every preset, mode, dtype and backend (`python -m epmoe bench`)", "",
        f"Plot: `results/{png}`.", "", *bench_table(raw),
    ]
    if "hf_peer" in raw:
        sys.path.insert(0, str(HERE))
        from hf_peer import table

        lines += ["", "## Hugging Face checkpoint: memory per rank, and transformers' own EP",
                  "", "`python benchmarks/hf_peer.py --reps 15`:", "", table(raw["hf_peer"])]
    if "shared_overlap" in raw:
        lines += ["", "## Shared expert during dispatch (`benchmarks/shared_overlap.py`)", "",
                  "```", raw["shared_overlap"].strip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rebuild", metavar="RAW_JSON", help="rewrite RESULTS.md from a run's "
                   "results/all_<date>.json, with a fresh profile")
    p.add_argument("--report", metavar="RAW_JSON", help="rewrite RESULTS.md from a run's "
                   "results/all_<date>.json, running nothing")
    p.add_argument("--fwd-bwd", metavar="JSON", nargs="+", help="with --report: "
                   "benchmarks/fwd_bwd.py's results to report instead of the raw file's own "
                   "(the first in full, the others as repeat runs)")
    a = p.parse_args()
    if a.rebuild:
        rebuild(a.rebuild)
    elif a.report:
        report_only(a.report, a.fwd_bwd)
    else:
        main(a.quick)
