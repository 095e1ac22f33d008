"""Serving throughput of ``epmoe serve`` beside vLLM (CPU) and transformers serve, one workload.

    python benchmarks/serving_model.py            # the checkpoint, once
    bash benchmarks/peers/vllm_cpu.sh             # vLLM's venv, once
    python benchmarks/serving.py                  # 3 rounds; writes SERVING.md, results/
    python benchmarks/serving.py --servers vllm transformers --rounds 1   # a quick look
    python benchmarks/serving.py --report-only    # SERVING.md again from the newest results

Each round starts every server in turn on a free port of 127.0.0.1 (the order
rotates from round to round), waits for it to answer ``GET /health`` (or
``/v1/models``), runs ``serve_bench.py`` against it and stops it (the whole
process group: SIGTERM, then SIGKILL), so that only one server holds the 2
cores at a time. A server that fails to start is skipped with its log's tail.
The report gives per server the median over rounds of each figure (runs with
failed requests left out and listed), epmoe-ep2 / vLLM computed within each
round (median and min-max over rounds), the decode floor of the newest
``results/membw_*.json`` beside epmoe-ep2's TPOT, and the newest
``results/generate_offline_*.json``. Each run also records the 1-minute load
average and the cores that other processes kept busy during it (/proc: all
CPU time less the server's process tree's and the client's); above 0.1 core in
any run, the report says the machine was not quiet.

Servers (``{model}``, ``{port}`` filled in; see ``SERVERS``):

    epmoe-ep2     torchrun --nproc_per_node=2 -m epmoe serve --model DIR --port P --dtype bfloat16
    epmoe-1       python -m epmoe serve --model DIR --port P --dtype bfloat16
    transformers  transformers serve --continuous-batching --device cpu --dtype bfloat16 DIR
    vllm          VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=2 vllm serve DIR

What ``epmoe serve`` must offer for this: ``--model --host --port --dtype``;
``GET /health`` answering 200 once it can serve (``/v1/models`` is tried too);
``POST /v1/completions`` with a string prompt, ``stream: true`` (SSE
``data:`` lines, ``data: [DONE]``), ``max_tokens``, ``temperature``,
``ignore_eos: true``, and ``stream_options: {include_usage: true}`` (a last
chunk with ``usage``); it must exit on SIGTERM to its process group.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import serve_bench  # noqa: E402

DEFAULT_VENV = HERE / ".venvs" / "vllm-cpu"


@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple[str, ...]  # with {model}, {port}, {master_port}, {python}, {vllm} to fill in
    env: dict = field(default_factory=dict)
    eos_mode: str = "field"  # serve_bench's --eos-mode
    startup_s: float = 600.0  # vLLM compiles its graphs at start


SERVERS = {
    "epmoe-ep2": Server("epmoe-ep2", (
        "{python}", "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", "--master_port={master_port}", "-m", "epmoe", "serve",
        "--model", "{model}", "--host", "127.0.0.1", "--port", "{port}", "--dtype", "bfloat16")),
    "epmoe-1": Server("epmoe-1", (
        "{python}", "-m", "epmoe", "serve", "--model", "{model}", "--host", "127.0.0.1",
        "--port", "{port}", "--dtype", "bfloat16")),
    # Rejects unknown fields (ignore_eos: 422) and token-id prompts: serve_bench
    # sends a GenerationConfig with min_new_tokens instead.
    "transformers": Server("transformers", (
        "{transformers}", "serve", "--continuous-batching", "--host", "127.0.0.1", "--port",
        "{port}", "--dtype", "bfloat16", "--device", "cpu", "{model}"),
        eos_mode="generation_config"),
    "vllm": Server("vllm", (
        "{vllm}", "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}", "--dtype",
        "bfloat16"),
        env={"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
             "VLLM_CPU_KVCACHE_SPACE": "2"}),
}
# Figures of the report: (key in serve_bench's summary, stat, label).
FIGURES = [("output_throughput", None, "output tok/s"),
           ("request_throughput", None, "req/s"),
           ("total_token_throughput", None, "total tok/s"),
           ("ttft_ms", "median", "median TTFT ms"),
           ("ttft_ms", "p99", "P99 TTFT ms"),
           ("tpot_ms", "median", "median TPOT ms"),
           ("itl_ms", "median", "median ITL ms"),
           ("e2el_ms", "median", "median E2EL ms")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(server: Server, model: str, port: int, vllm_venv: Path) -> list[str]:
    fill = dict(python=sys.executable, model=model, port=port, master_port=free_port(),
                vllm=str(vllm_venv / "bin" / "vllm"),
                transformers=shutil.which("transformers") or "transformers")
    return [a.format(**fill) for a in server.argv]


def shown(argv: list[str], env: dict) -> str:
    """The command as one would type it, from the repository root."""
    line = " ".join(argv).replace(sys.executable + " -m torch.distributed.run", "torchrun")
    line = line.replace(sys.executable, "python").replace(str(HERE.parent) + "/", "")
    if shutil.which("transformers"):
        line = line.replace(shutil.which("transformers"), "transformers")
    return " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + line


class Running:
    """One server process group, started in its own session; ``stop`` ends all of it."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=HERE.parent)

    def wait_ready(self, base_url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with code {self.proc.returncode}")
            for path in ("/health", "/v1/models"):
                try:
                    if httpx.get(base_url + path, timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(2)
        raise RuntimeError(f"not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Children that outlived the leader (engine cores, torchrun's workers).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log_file.close()

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _busy_ticks() -> int:
    """CPU time all CPUs spent busy since boot (user, nice, system, irq, softirq), in ticks."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return user + nice + system + irq + softirq


def _tree_ticks(root: int) -> int:
    """CPU time of process ``root``, its descendants and their reaped children, in ticks
    (by parent links: torchrun starts its workers in sessions of their own)."""
    stats = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # state ppid ... utime (11) stime
        stats[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total


def _cpu_snapshot(server_pid: int) -> tuple[float, int, int, float]:
    t = os.times()
    return time.monotonic(), _busy_ticks(), _tree_ticks(server_pid), t.user + t.system


def other_cpu_cores(before: tuple, after: tuple) -> float:
    """Cores that processes other than the server under test and this client kept busy
    between two snapshots, on average: other work on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    wall = after[0] - before[0]
    busy = (after[1] - before[1]) / tick
    ours = (after[2] - before[2]) / tick + (after[3] - before[3])
    return max(0.0, busy - ours) / wall if wall > 0 else 0.0


def run_one(server: Server, model: str, vllm_venv: Path, bench: dict, log_dir: Path,
            round_: int) -> tuple[dict | None, str]:
    """Start ``server``, benchmark it, stop it. Returns (summary or None, command shown)."""
    port = free_port()
    argv = command(server, model, port, vllm_venv)
    cmd = shown(argv, server.env).replace(f"--port {port}", "--port PORT")
    cmd = re.sub(r"--master_port=\d+", "--master_port=FREE_PORT", cmd)
    if not Path(argv[0]).exists() and shutil.which(argv[0]) is None:
        print(f"[{server.name}] skipped: {argv[0]} not found")
        return None, cmd
    base_url = f"http://127.0.0.1:{port}"
    print(f"[{server.name}] round {round_}: {cmd}", flush=True)
    proc = Running(argv, server.env, log_dir / f"{server.name}_r{round_}.log")
    try:
        t0 = time.monotonic()
        try:
            proc.wait_ready(base_url, server.startup_s)
        except RuntimeError as e:
            print(f"[{server.name}] skipped: the server did not start ({e}); log {proc.log}:\n"
                  f"{proc.tail()}", flush=True)
            return None, cmd
        print(f"[{server.name}] ready in {time.monotonic() - t0:.0f} s", flush=True)
        load_before = os.getloadavg()[0]
        cpu_before = _cpu_snapshot(proc.proc.pid)
        try:
            summary = serve_bench.main(base_url=base_url, eos_mode=server.eos_mode,
                                       label=f"{server.name} round {round_}", **bench)
        except Exception as e:  # a failed benchmark skips this server's round
            print(f"[{server.name}] benchmark failed: {type(e).__name__}: {e}", flush=True)
            return None, cmd
        # Other work on the machine skews the figures: keep its trace beside them.
        summary["load_avg_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
        summary["other_cpu_cores"] = other_cpu_cores(cpu_before, _cpu_snapshot(proc.proc.pid))
        if summary["failed"]:
            print(f"[{server.name}] {summary['failed']} requests failed: {summary['errors']}")
        return summary, cmd
    finally:
        proc.stop()


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
    out = {}
    for key, stat, label in FIGURES:
        vals = [r[key][stat] if stat else r[key] for r in runs]
        vals = [v for v in vals if v is not None]
        out[label] = {"median": statistics.median(vals) if vals else None,
                      "min": min(vals, default=None), "max": max(vals, default=None)}
    return out


def _latest(pattern: str, out_dir: Path = HERE / "results") -> dict | None:
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


def _load_range(report: dict, when: str) -> tuple[float, float]:
    vals = [r["load_avg_1min"][when] for res in report["servers"].values() for r in res["runs"]]
    return min(vals), max(vals)


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
              else _latest("serving_*.json"))
    if report is None:
        raise FileNotFoundError("no results/serving_*.json: run benchmarks/serving.py")
    write_markdown(Path(markdown), report, _latest("membw_*.json"),
                   _latest("generate_offline_*.json"))
    png = HERE / "results" / f"serving_{report['date']}.png"
    plot(png, report)
    print(f"wrote {markdown}, {png}")


def plot(path: Path, report: dict) -> None:
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


def main(servers: list[str] | None = None, model: str = str(HERE / ".serving_model"),
         rounds: int = 3, num_prompts: int = 32, input_len: int = 128, output_len: int = 64,
         request_rate: float = float("inf"), max_concurrency: int | None = None,
         vllm_venv: str = str(DEFAULT_VENV), out_dir: str = str(HERE / "results"),
         markdown: str | None = str(HERE / "SERVING.md"), note: str = "") -> dict:
    """Run the rounds; write JSON and PNG to ``out_dir`` and the table to ``markdown``."""
    servers = servers or list(SERVERS)
    unknown = set(servers) - set(SERVERS)
    if unknown:
        raise ValueError(f"servers must be among {list(SERVERS)}, got {sorted(unknown)}")
    model = str(Path(model).resolve())
    if not (Path(model) / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint at {model}: run benchmarks/serving_model.py")
    out = Path(out_dir)
    log_dir = out / "serving_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    bench = dict(tokenizer=model, num_prompts=num_prompts, input_len=input_len,
                 output_len=output_len, request_rate=request_rate,
                 max_concurrency=max_concurrency)
    results = {name: {"runs": [], "command": ""} for name in servers}
    # SIGTERM to us: unwind through the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for r in range(rounds):
        order = servers[r % len(servers):] + servers[:r % len(servers)]
        for name in order:
            summary, cmd = run_one(SERVERS[name], model, Path(vllm_venv), bench, log_dir, r)
            results[name]["command"] = cmd
            if summary is not None:
                summary.pop("per_request", None)
                results[name]["runs"].append(summary)
    for res in results.values():
        res["median"] = medians(complete(res["runs"])) if complete(res["runs"]) else None
    rate = "inf" if request_rate == float("inf") else request_rate
    bench_cmd = (f"python benchmarks/serve_bench.py --base-url http://127.0.0.1:PORT "
                 f"--tokenizer {shown([model], {})} --num-prompts {num_prompts} --input-len "
                 f"{input_len} --output-len {output_len} --request-rate {rate}"
                 + (f" --max-concurrency {max_concurrency}" if max_concurrency else "")
                 + " --eos-mode field")
    report = {"date": str(datetime.date.today()), "rounds": rounds,
              "machine": f"{os.cpu_count()} CPUs, {_mem_gib():.0f} GiB",
              "workload": dict(num_prompts=num_prompts, input_len=input_len,
                               output_len=output_len, request_rate=str(rate),
                               max_concurrency=max_concurrency),
              "bench_command": bench_cmd, "note": note, "servers": results}
    stem = out / f"serving_{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(stem.with_suffix(".png"), report)
    if markdown:
        write_markdown(Path(markdown), report, _latest("membw_*.json", out),
                       _latest("generate_offline_*.json", out))
    print(f"\n{'server':<14}" + "".join(f"{label:>17}" for _, _, label in FIGURES))
    for name, res in results.items():
        cells = (["skipped".rjust(17)] if not res["median"] else
                 [f"{res['median'][label]['median']:17.1f}" for _, _, label in FIGURES])
        print(f"{name:<14}" + "".join(cells))
    print(f"wrote {stem}.json, {stem}.png" + (f", {markdown}" if markdown else ""))
    return report


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", nargs="+", choices=list(SERVERS), default=None,
                   help="which servers, in round-1 order (default: all)")
    p.add_argument("--model", default=str(HERE / ".serving_model"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--vllm-venv", default=str(DEFAULT_VENV),
                   help="made by benchmarks/peers/vllm_cpu.sh")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--markdown", default=str(HERE / "SERVING.md"),
                   help="the report's table ('' for none)")
    p.add_argument("--note", default="", help="a line added to the report")
    p.add_argument("--report-only", nargs="?", const="", default=None, metavar="JSON",
                   help="run nothing: rewrite --markdown from a serving JSON (default: the "
                        "newest in results/), the newest membw and generate_offline JSON")
    a = vars(p.parse_args())
    report_only = a.pop("report_only")
    if report_only is not None:
        rewrite_markdown(report_only or None, a["markdown"])
    else:
        main(**a)
