"""The GPU check's summary: a table of its steps and ``gpu_check.json``.

``scripts/gpu_check.sh`` writes one tab-separated line per step (name, kind, result,
seconds, log, artifact, note) and calls this at the end:

    python scripts/gpu_summary.py --steps gpu_check_logs/steps.tsv --json gpu_check.json \
        --nvidia-smi gpu_check_logs/nvidia-smi.csv --started 2026-12-07T10:00:00Z --seconds 301

Each step's key figure comes from its artifact: ``pytest`` the JUnit XML (passed,
failed, skipped), ``demo`` its log (the check line against the reference), ``bench``
the JSON of ``python -m epmoe bench`` (tokens/s). Exit code 0 when no step failed or
timed out, else 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import socket
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FIELDS = ("name", "kind", "result", "seconds", "log", "artifact", "note")


def junit(path: Path) -> tuple[str, list[dict]]:
    """``"N passed, F failed, S skipped"`` and one entry per test case."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "").splitlines()[0][:300] if el.get(
                    "message") else ""
                break
        cases.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          seconds=round(float(case.get("time") or 0), 2), message=message))
    n = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error",
                                                             "skipped")}
    figure = f"{n['passed']} passed, {n['failed'] + n['error']} failed, {n['skipped']} skipped"
    return figure, cases


def demo_figure(log: Path) -> str:
    """The demo's check line: ``max abs error 1.2e-07 -> PASS``."""
    m = re.search(r"max abs error (\S+).*-> (PASS|FAIL)", log.read_text(errors="replace"))
    return f"max abs error {m.group(1)} -> {m.group(2)}" if m else ""


def bench_figure(path: Path) -> tuple[str, list[dict]]:
    rows = json.loads(path.read_text())["results"]
    keep = ("preset", "mode", "tokens_per_rank", "dtype", "backend", "tokens_per_s", "layer_ms",
            "efficiency")
    rows = [{k: r.get(k) for k in keep} for r in rows]
    figure = ", ".join(f"{r['tokens_per_s']:.0f} tok/s ({r['mode']} {r['tokens_per_rank']})"
                       for r in rows)
    return figure, rows


def step_of(line: str) -> dict:
    values = line.rstrip("\n").split("\t")
    step = dict(zip(FIELDS, values + [""] * (len(FIELDS) - len(values)), strict=True))
    step["seconds"] = float(step["seconds"] or 0)
    figure, details = "", None
    artifact = Path(step["artifact"]) if step["artifact"] else None
    try:
        if step["kind"] == "pytest" and artifact and artifact.is_file():
            figure, details = junit(artifact)
        elif step["kind"] == "demo" and step["log"] and Path(step["log"]).is_file():
            figure = demo_figure(Path(step["log"]))
        elif step["kind"] == "bench" and artifact and artifact.is_file():
            figure, details = bench_figure(artifact)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as e:
        figure = f"(unreadable {step['artifact'] or step['log']}: {e})"
    step["figure"] = figure or step["note"]
    if details is not None:
        step["details"] = details
    return step


def machine(nvidia_smi: Path | None) -> dict:
    gpus, driver = [], None
    if nvidia_smi is not None and nvidia_smi.is_file():
        for line in nvidia_smi.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2:
                gpus.append(parts[0] if len(parts) < 3 else f"{parts[0]} ({parts[2]})")
                driver = parts[1]
    out = dict(gpus=gpus, driver=driver, host=socket.gethostname(),
               python=platform.python_version(), platform=platform.platform())
    try:
        import torch

        out.update(torch=torch.__version__, cuda=torch.version.cuda,
                   cuda_available=torch.cuda.is_available(),
                   torch_gpus=[torch.cuda.get_device_name(i)
                               for i in range(torch.cuda.device_count())]
                   if torch.cuda.is_available() else [])
    except ImportError as e:
        out.update(torch=None, cuda=None, torch_error=str(e))
    return out


def table(steps: list[dict]) -> str:
    head = ("step", "result", "seconds", "key figure")
    rows = [(s["name"], s["result"], f"{s['seconds']:.0f}", s["figure"]) for s in steps]
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = [f"{head[0]:<{w[0]}}  {head[1]:<{w[1]}}  {head[2]:>{w[2]}}  {head[3]}",
             f"{'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}  {'-' * 10}"]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def main(steps: str, json_path: str, nvidia_smi: str | None, started: str, seconds: float,
         dry_run: bool) -> int:
    lines = [ln for ln in Path(steps).read_text().splitlines() if ln.strip()]
    done = [step_of(ln) for ln in lines]
    ok = all(s["result"] in ("pass", "skip") for s in done)
    report = dict(machine=machine(Path(nvidia_smi) if nvidia_smi else None), started=started,
                  seconds=seconds, dry_run=dry_run, ok=ok, steps=done)
    Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    m = report["machine"]
    print(f"\nGPU check{' (dry run)' if dry_run else ''}: {', '.join(m['gpus']) or 'no GPU'}; "
          f"driver {m['driver']}; torch {m.get('torch')} (CUDA {m.get('cuda')}); "
          f"{seconds:.0f} s\n")
    print(table(done))
    print(f"\n{'OK' if ok else 'FAILED'}: wrote {json_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", required=True, help="the steps file (tab-separated lines)")
    p.add_argument("--json", dest="json_path", required=True, help="where the JSON goes")
    p.add_argument("--nvidia-smi", default=None, help="nvidia-smi's CSV (name, driver, memory)")
    p.add_argument("--started", default="", help="when the check started (ISO 8601)")
    p.add_argument("--seconds", type=float, default=0.0, help="how long the check took")
    p.add_argument("--dry-run", action="store_true", help="say that this was a dry run")
    sys.exit(main(**vars(p.parse_args())))
