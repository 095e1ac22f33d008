"""The serving benchmark's report: SERVING.md, its PNG and the figures behind them.

    python benchmarks/serving.py --report-only    # SERVING.md again from the newest results

``serving.py`` runs the servers and the load and hands its report dict here;
``--report-only`` (``rewrite_markdown``) rebuilds everything from the JSON in
``results/``. The report gives per server the median over rounds of each
figure (runs with failed requests left out and listed), epmoe-ep2 / vLLM
computed within each round, the decode floor of the newest
``results/membw_*.json`` beside epmoe-ep2's TPOT, the newest
``results/generate_offline_*.json`` and the load on the machine per run.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Figures of the report: (key in serve_bench's summary, stat, label).
FIGURES = [("output_throughput", None, "output tok/s"),
           ("request_throughput", None, "req/s"),
           ("total_token_throughput", None, "total tok/s"),
           ("ttft_ms", "median", "median TTFT ms"),
           ("ttft_ms", "p99", "P99 TTFT ms"),
           ("tpot_ms", "median", "median TPOT ms"),
           ("itl_ms", "median", "median ITL ms"),
           ("e2el_ms", "median", "median E2EL ms")]


def complete(runs: list[dict]) -> list[dict]:
    """The runs in which every request succeeded: the only ones the figures use."""
    return [r for r in runs if not r["failed"]]


def with_medians(report: dict) -> dict:
    """``report`` with each server's ``median`` (re)computed over its complete runs."""
    servers = {}
    for name, res in report["servers"].items():
        ok = complete(res["runs"])
        servers[name] = {**res, "median": medians(ok) if ok else None}
    return {**report, "servers": servers}


def medians(runs: list[dict]) -> dict:
    """Per figure label: the median, min and max over ``runs`` (serve_bench summaries)."""
    out = {}
    for key, stat, label in FIGURES:
        vals = [r[key][stat] if stat else r[key] for r in runs]
        vals = [v for v in vals if v is not None]
        out[label] = {"median": statistics.median(vals) if vals else None,
                      "min": min(vals, default=None), "max": max(vals, default=None)}
    return out


def latest(pattern: str, out_dir: Path = HERE / "results") -> dict | None:
    """The newest results file matching ``pattern`` (dates sort as text), or None."""
    paths = sorted(out_dir.glob(pattern))
    return json.loads(paths[-1].read_text()) if paths else None


def _round_of(run: dict) -> int | None:
    m = re.search(r"round (\d+)$", run.get("config", {}).get("label", ""))
    return int(m.group(1)) if m else None


def per_round_ratios(report: dict, num: str = "epmoe-ep2", den: str = "vllm") -> dict | None:
    """``num`` over ``den`` round by round (same round: same machine state, back to back):
    output throughput and median TTFT; each with the median and min-max over rounds."""
    s = report["servers"]
    if not (s.get(num, {}).get("runs") and s.get(den, {}).get("runs")):
        return None
    a = {_round_of(r): r for r in complete(s[num]["runs"])}
    b = {_round_of(r): r for r in complete(s[den]["runs"])}
    rounds = sorted(k for k in a.keys() & b.keys() if k is not None)
    if not rounds:
        return None
    out = {"rounds": rounds}
    for key, get in (("output_throughput", lambda r: r["output_throughput"]),
                     ("median_ttft", lambda r: r["ttft_ms"]["median"]),
                     ("median_tpot", lambda r: r["tpot_ms"]["median"])):
        vals = [get(a[k]) / get(b[k]) for k in rounds]
        out[key] = {"per_round": vals, "median": statistics.median(vals), "min": min(vals),
                    "max": max(vals)}
    return out


def write_markdown(path: Path, report: dict, membw: dict | None = None,
                   offline: dict | None = None) -> None:
    """SERVING.md: the table, epmoe-ep2/vLLM per round, the decode floor (``membw``:
    membw.py's JSON) and the offline generate figures (``offline``: generate_offline.py's).
    Runs with failed requests are left out of every figure and listed."""
    report = with_medians(report)
    w = report["workload"]
    lines = [
        "# Serving throughput: epmoe serve beside vLLM (CPU) and transformers serve",
        "",
        f"Written by `python benchmarks/serving.py` on {report['date']}. Machine: "
        f"{report['machine']}. Workload: {w['num_prompts']} requests sent at once "
        f"(request rate {w['request_rate']}), {w['input_len']} prompt tokens, "
        f"{w['output_len']} output tokens each (EOS ignored), streamed /v1/completions, "
        f"greedy; checkpoint `benchmarks/serving_model.py` (random 4-layer Qwen3-MoE, "
        f"hidden 1024, 8 experts top-2, bf16). Each figure is the median over "
        f"{report['rounds']} interleaved rounds (a fresh server per round; min-max in "
        f"the JSON). Definitions are `vllm bench serve`'s (see `serve_bench.py`)."
        + (f" Code: {report['code']}." if report.get("code") else ""),
        "",
        *([f"**{report['note']}**", ""] if report.get("note") else []),
        *_quiet_lines(report),
        "| server | " + " | ".join(label for _, _, label in FIGURES) + " | rounds |",
        "| --- |" + " ---: |" * (len(FIGURES) + 1),
    ]
    for name, res in report["servers"].items():
        n_ok, n_bad = len(complete(res["runs"])), len(res["runs"]) - len(complete(res["runs"]))
        counted = f"{n_ok}" + (f" ({n_bad} failed)" if n_bad else "")
        if not res["median"]:
            lines.append(f"| {name} | " + " | ".join("-" for _ in FIGURES) +
                         f" | {counted or 0} (skipped) |")
            continue
        cells = [f"{res['median'][label]['median']:.1f}" for _, _, label in FIGURES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {counted} |")
    failed = [(name, _round_of(r), r) for name, res in report["servers"].items()
              for r in res["runs"] if r["failed"]]
    if failed:
        lines += ["", "Runs left out (requests failed; the server's log is "
                  "`results/serving_logs/<server>_r<round>.log`): " + "; ".join(
                      f"{name} round {rnd}: {r['failed']} of {r['failed'] + r['completed']} "
                      f"requests failed ({'; '.join(r['errors'])})" for name, rnd, r in failed)
                  + "."]
    ratio = per_round_ratios(report)
    if ratio:
        def fmt(key: str) -> str:
            r = ratio[key]
            return (f"{r['median']:.2f} (min-max {r['min']:.2f}-{r['max']:.2f}; rounds: "
                    + ", ".join(f"{v:.2f}" for v in r["per_round"]) + ")")

        lines += ["", "epmoe-ep2 / vLLM, computed within each round (the two ran back to back "
                  "there) and then the median over rounds: "
                  f"output throughput {fmt('output_throughput')}; median TTFT "
                  f"{fmt('median_ttft')}; median TPOT {fmt('median_tpot')}."]
    if membw:
        lines += _floor_lines(report, membw)
    if offline:
        lines += _offline_lines(offline)
    lines += ["", "## Commands", "",
              "Servers (the port is a free one of 127.0.0.1, chosen per run):", ""]
    for name, res in report["servers"].items():
        lines += [f"- {name}: `{res['command']}`"]
    b = report["bench_command"]
    lines += ["", f"Load: `{b}`", "",
              "`--eos-mode generation_config` for transformers serve, which answers 422 to "
              "`ignore_eos`; it gets `generation_config` JSON with min_new_tokens = "
              "max_new_tokens instead.", "",
              "Decode floor: `python benchmarks/membw.py`; offline generate: "
              "`python benchmarks/generate_offline.py`; the report alone, from the newest "
              "results: `python benchmarks/serving.py --report-only`.", "",
              "## Load on the machine", "",
              "1-minute load average when each server was ready (before its benchmark) and "
              "right after it (the benchmarked server itself keeps both cores busy and the "
              "servers run back to back, so these figures include the benchmark's own load), "
              "and in brackets the cores other processes "
              "kept busy during the benchmark (/proc: all CPU time less the server's and the "
              "client's): "
              + "; ".join(f"{name} " + ", ".join(
                  f"{r['load_avg_1min']['before']:.1f}->{r['load_avg_1min']['after']:.1f}"
                  + (f" [{r['other_cpu_cores']:.2f}]" if "other_cpu_cores" in r else "")
                  for r in res["runs"]) for name, res in report["servers"].items()
                  if res["runs"]), ""]
    if report.get("load_note"):
        lines += [report["load_note"], ""]
    path.write_text("\n".join(lines))


QUIET_CORES = 0.1  # other work above this (cores, during any run) marks the figures


def _quiet_lines(report: dict) -> list[str]:
    """A banner when other work used the CPUs during a run (measured from /proc per run)."""
    other = [(name, _round_of(r), r["other_cpu_cores"]) for name, res in
             report["servers"].items() for r in res["runs"] if "other_cpu_cores" in r]
    if not other:
        return []
    busy = [(n, k, c) for n, k, c in other if c > QUIET_CORES]
    if not busy:
        return [f"Quiet machine: other processes used at most "
                f"{max(c for *_, c in other):.2f} of the 2 cores during any run "
                f"(measured from /proc, per run; load averages below).", ""]
    return [f"**Not a quiet machine: other processes used more than {QUIET_CORES} core "
            f"during {len(busy)} of {len(other)} runs (" + ", ".join(
                f"{n} round {k}: {c:.2f}" for n, k, c in busy) + " cores); those figures are "
            "skewed.**", ""]


def _floor_lines(report: dict, membw: dict) -> list[str]:
    batch = membw["config"]["batch"]
    f = membw["floor"].get(f"batch_{batch}")
    two = membw["two_processes_1_thread_each"]
    ep2 = report["servers"].get("epmoe-ep2") or {}
    lines = ["", "## Decode floor (memory bandwidth)", "",
             f"`benchmarks/membw.py`: one decode step of {batch} sequences on 2 ranks "
             f"(EP=2, {membw['bytes']['sequences_per_rank']} sequences per rank, context "
             f"{membw['config']['context']} tokens) reads "
             f"{f['bytes_per_rank'] / 1e6:.1f} MB per rank (dense weights "
             f"{membw['bytes']['dense_bytes'] / 1e6:.1f} MB, the rank's experts "
             f"{membw['bytes']['experts_bytes_batch'] / 1e6:.1f} MB, KV cache "
             f"{membw['bytes']['kv_bytes_batch'] / 1e6:.1f} MB). Read bandwidth per rank with "
             f"both ranks reading at once: {two['read_gbs_per_rank']:.1f} GB/s (one process: "
             f"{membw['one_process_1_threads']['read_gbs']:.1f} GB/s on 1 thread, "
             f"{membw['one_process_2_threads']['read_gbs']:.1f} on 2). Floor: "
             f"{f['memory_s'] * 1e3:.2f} ms of reading + {membw['bytes']['moe_layers'] * 2} "
             f"gloo all-to-alls {f['all_to_all_s'] * 1e3:.2f} ms = "
             f"**{f['step_s'] * 1e3:.2f} ms per step** "
             f"(at most {f['output_tok_s_ceiling']:.0f} output tok/s)."]
    if ep2.get("median"):
        tpot = ep2["median"]["median TPOT ms"]
        itl = ep2["median"]["median ITL ms"]
        lines += ["", f"Measured, epmoe-ep2: median TPOT {tpot['median']:.1f} ms "
                  f"(min-max {tpot['min']:.1f}-{tpot['max']:.1f}), "
                  f"**{tpot['median'] / (f['step_s'] * 1e3):.1f}x the floor**; median ITL "
                  f"{itl['median']:.1f} ms ({itl['median'] / (f['step_s'] * 1e3):.1f}x). "
                  f"TPOT here includes the prefills of the other requests that fall within a "
                  f"request's decode, so it bounds the decode step from above."]
    return lines


def _offline_lines(o: dict) -> list[str]:
    w = o["workload"]

    def mm(d: dict, fmt: str = ".1f") -> str:
        return f"{d['median']:{fmt}} (min-max {d['min']:{fmt}}-{d['max']:{fmt}})"

    return ["", "## Offline generate", "",
            f"`python benchmarks/generate_offline.py` on {o['date']}: the same checkpoint "
            f"and the serving benchmark's {w['num_prompts']} prompts of {w['input_len']} "
            f"token ids, {w['max_new_tokens']} new tokens each (EOS ignored), "
            f"{o['reps']} interleaved repetitions, medians; each run a fresh process, timed "
            f"over its generation (model loading excluded)."
            + (f" Other processes kept at most {o['other_cpu_cores_max']:.2f} cores busy "
               f"during a repetition." if "other_cpu_cores_max" in o else ""), "",
            "| | output tok/s |", "| --- | ---: |",
            f"| `epmoe generate`, 2 ranks (tokens / slowest rank's seconds) | "
            f"{mm(o['epmoe_tok_s'])} |",
            f"| transformers `model.generate`, one batch, first call (cold) | "
            f"{mm(o['transformers_cold_tok_s'])} |",
            f"| transformers `model.generate`, second call (warm) | "
            f"{mm(o['transformers_warm_tok_s'])} |", "",
            f"epmoe / transformers, per repetition then median: "
            f"{mm(o['ratio_epmoe_to_transformers_cold'], '.2f')} against the cold call, "
            f"{mm(o['ratio_epmoe_to_transformers_warm'], '.2f')} against the warm one.", "",
            f"- epmoe: `{o['epmoe_command']}` (FILE: one line of comma-separated ids per "
            f"prompt)",
            f"- transformers: `{o['transformers_call']}`"]


def rewrite_markdown(serving_json: str | None = None,
                     markdown: str = str(HERE / "SERVING.md")) -> None:
    """SERVING.md again from the newest (or given) serving JSON, membw and generate results."""
    report = (json.loads(Path(serving_json).read_text()) if serving_json
              else latest("serving_*.json"))
    if report is None:
        raise FileNotFoundError("no results/serving_*.json: run benchmarks/serving.py")
    write_markdown(Path(markdown), report, latest("membw_*.json"),
                   latest("generate_offline_*.json"))
    png = HERE / "results" / f"serving_{report['date']}.png"
    plot(png, report)
    print(f"wrote {markdown}, {png}")


def plot(path: Path, report: dict) -> None:
    """Output tok/s, median TTFT and median TPOT per server (bars: min-max over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = with_medians(report)
    names = [n for n, r in report["servers"].items() if r["median"]]
    if not names:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, label in zip(axes, ("output tok/s", "median TTFT ms", "median TPOT ms"), strict=True):
        med = [report["servers"][n]["median"][label] for n in names]
        y = [m["median"] for m in med]
        err = [[v - m["min"] for v, m in zip(y, med, strict=True)],
               [m["max"] - v for v, m in zip(y, med, strict=True)]]
        ax.bar(names, y, yerr=err, capsize=4, color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
        for i, v in enumerate(y):
            ax.annotate(f"{v:.0f}", (i, v / 2), ha="center", color="white", fontsize=9)
    w = report["workload"]
    fig.suptitle(f"{w['num_prompts']} requests at once, {w['input_len']} in / "
                 f"{w['output_len']} out tokens; median of {report['rounds']} rounds "
                 f"(bars: min-max); {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

