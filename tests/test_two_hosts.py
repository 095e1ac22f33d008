"""Two hosts made of network namespaces (scripts/two_hosts.sh): epmoe across real TCP.

Each test builds a fresh pair of hosts joined by a veth pair and runs one torchrun
per host, as on two machines:

    scripts/two_hosts.sh run I torchrun --nnodes=2 --node-rank=I --nproc-per-node=1 \
        --rdzv-backend=c10d --rdzv-endpoint=10.77.0.1:PORT --local-addr=10.77.0.(I+1) ...

the demo and ``-m epmoe check`` pass across them, also through a link limited
by tbf; a link cut in the middle of a long check makes the worker on each side
end, about the timeout after the cut, with the error that names the rank beyond
it. Needs root and iproute2 (skipped with the reason otherwise); ~60 s on 2 cores.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "two_hosts.sh"
ADDR = ("10.77.0.1", "10.77.0.2")
TIMEOUT_S = 8  # the check's collective timeout in the cut test
BOOT_S = 120  # the most a torchrun pair may take to start and finish a short run


def _sh(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _netns_pids(env: dict[str, str]) -> list[int]:
    pids = []
    for ns in (env["EPMOE_NS0"], env["EPMOE_NS1"]):
        p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                           timeout=10)
        pids += [int(s) for s in p.stdout.split()]
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except FileNotFoundError:
        return False


@pytest.fixture
def hosts():
    """The environment that names a fresh pair of hosts (this test's own names)."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2: 'ip' is not on PATH")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and a veth pair")
    tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
    env = dict(os.environ, EPMOE_NS0=f"epmoe_t{tag}_h0", EPMOE_NS1=f"epmoe_t{tag}_h1",
               EPMOE_VETH0=f"ept{tag}a", EPMOE_VETH1=f"ept{tag}b",
               EPMOE_ADDR0=ADDR[0], EPMOE_ADDR1=ADDR[1],
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    up = _sh(env, "up")
    if up.returncode != 0:
        _sh(env, "down")
        pytest.skip(f"cannot create network namespaces here: {up.stderr.strip()}")
    try:
        yield env
    finally:
        _sh(env, "down")


class Torchrun:
    """One host's torchrun agent (and its worker); output lines kept with their arrival time."""

    def __init__(self, env: dict[str, str], node: int, port: int, run_id: str,
                 *args: str) -> None:
        self.node = node
        cmd = [str(SCRIPT), "run", str(node), sys.executable, "-m", "torch.distributed.run",
               "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1", "--max-restarts=0",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={ADDR[0]}:{port}", f"--rdzv-id={run_id}",
               # Both hosts have the machine's hostname: say who hosts the rendezvous store
               # and which address this node advertises (MASTER_ADDR of the workers).
               f"--rdzv-conf=is_host={int(node == 0)}", f"--local-addr={ADDR[node]}", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[tuple[float, str, str]] = []  # (time.monotonic(), stream, line)
        self._readers = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                         for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._readers:
            t.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), name, line.rstrip("\n")))

    def first(self, pattern: str, stream: str = "err") -> tuple[float, str] | None:
        """The first line of ``stream`` that matches ``pattern``, and when it came."""
        for t, s, line in list(self.lines):
            if s == stream and re.search(pattern, line):
                return t, line
        return None

    def count(self, pattern: str, stream: str = "out") -> int:
        return sum(1 for _, s, line in list(self.lines) if s == stream and re.search(pattern, line))

    def text(self, stream: str | None = None) -> str:
        return "\n".join(f"[{s}] {line}" for _, s, line in list(self.lines)
                         if stream in (None, s))

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        for t in self._readers:
            t.join(timeout=5)


def _run_pair(env: dict[str, str], *args: str, timeout: float = BOOT_S
              ) -> tuple[list[Torchrun], float]:
    """One torchrun per host with ``args``; both must end with 0 within ``timeout``."""
    port, run_id = random.randrange(20000, 60000), f"epmoe{random.randrange(10**6)}"
    t0 = time.monotonic()
    runs = [Torchrun(env, node, port, run_id, *args) for node in (0, 1)]
    try:
        for r in runs:
            r.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for r in runs:
            r.kill()
    seconds = time.monotonic() - t0
    for r in runs:
        assert r.proc.returncode == 0, (f"host {r.node}: exit {r.proc.returncode} after "
                                        f"{seconds:.1f} s\n{r.text()}")
    return runs, seconds


SINK = """
import socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = srv.accept()
n, t0 = 0, None
while chunk := conn.recv(1 << 16):
    t0 = t0 or time.monotonic()
    n += len(chunk)
print(n, time.monotonic() - t0, flush=True)
"""


def _throughput_mbit(env: dict[str, str], nbytes: int = 4 << 20) -> float:
    """Mbit/s of one TCP stream from host 1 to host 0 (what tbf lets through)."""
    port = random.randrange(20000, 60000)
    sink = subprocess.Popen([str(SCRIPT), "run", "0", sys.executable, "-c", SINK, ADDR[0],
                             str(port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        send = (f"import socket; s = socket.create_connection(('{ADDR[0]}', {port}), timeout=20);"
                f" s.sendall(bytes({nbytes})); s.close()")
        sent = _sh(env, "run", "1", sys.executable, "-c", send)
        assert sent.returncode == 0, sent.stderr
        n, seconds = sink.communicate(timeout=30)[0].split()
    finally:
        sink.kill()
        sink.wait(timeout=10)
    assert int(n) == nbytes
    return int(n) * 8 / float(seconds) / 1e6


def _tx_bytes(env: dict[str, str], node: int) -> int:
    veth = env[f"EPMOE_VETH{node}"]
    p = _sh(env, "run", str(node), "cat", f"/sys/class/net/{veth}/statistics/tx_bytes")
    return int(p.stdout)


@pytest.mark.parametrize("rate", [None, "50mbit"])
def test_demo_and_check_across_two_hosts(hosts, rate):
    if rate is not None:
        if shutil.which("tc") is None:
            pytest.skip("needs tc (iproute2) for the tbf limit")
        limited = _sh(hosts, "limit", rate)
        assert limited.returncode == 0, limited.stderr
        qdisc = subprocess.run(["tc", "-n", hosts["EPMOE_NS0"], "qdisc", "show"],
                               capture_output=True, text=True, timeout=10).stdout
        assert "tbf" in qdisc, qdisc
        mbit = _throughput_mbit(hosts)
        print(f"\nthrough tbf {rate}: one TCP stream moves {mbit:.1f} Mbit/s")
        assert mbit < 1.2 * int(rate.removesuffix("mbit")), f"{mbit:.1f} Mbit/s"
    sent = [_tx_bytes(hosts, n) for n in (0, 1)]

    runs, demo_s = _run_pair(hosts, "demo.py", "--force-cpu")
    out = runs[0].text("out")
    assert "2 rank(s), EP groups of 2 (DP=1), backend gloo" in out, out
    assert out.count("-> PASS") == 1 and "FAIL" not in out, out

    runs, check_s = _run_pair(hosts, "-m", "epmoe", "check", "--force-cpu")
    out = runs[0].text("out")
    passed = [line for line in out.splitlines() if "on 2 rank(s)" in line and "-> PASS" in line]
    assert len(passed) == 3 and "FAIL" not in out, out  # one line per all2all backend

    crossed = [_tx_bytes(hosts, n) - sent[n] for n in (0, 1)]
    assert min(crossed) > 10_000, crossed  # the ranks really talked over the veth link
    print(f"\ntwo hosts, link {rate or 'unlimited'}: demo {demo_s:.1f} s, check {check_s:.1f} s "
          f"(torchrun start to end); bytes sent host 0 -> 1: {crossed[0]}, 1 -> 0: {crossed[1]}")


def test_cut_link_names_the_unreachable_rank_on_both_sides(hosts):
    port, run_id = random.randrange(20000, 60000), f"epmoe{random.randrange(10**6)}"
    args = ("-m", "epmoe", "check", "--force-cpu", "--backend", "alltoall",
            "--forwards", "100000", "--progress", "10", "--timeout", str(TIMEOUT_S))
    runs = [Torchrun(hosts, node, port, run_id, *args) for node in (0, 1)]
    pids: list[int] = []
    try:
        deadline = time.monotonic() + BOOT_S
        while runs[0].count(r"forward \d+/100000 ok") < 2:  # it runs, across the link
            assert time.monotonic() < deadline and all(r.proc.poll() is None for r in runs), (
                "\n".join(f"--- host {r.node}\n{r.text()}" for r in runs))
            time.sleep(0.1)
        cut = _sh(hosts, "cut")
        t_cut = time.monotonic()
        assert cut.returncode == 0, cut.stderr

        pattern = r"^epmoe check: rank \d+: "
        deadline = t_cut + TIMEOUT_S + 30
        while not all(r.first(pattern) for r in runs) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = _netns_pids(hosts)
        found = [r.first(pattern) for r in runs]
        assert all(found), ("a side did not report the cut within "
                            f"{TIMEOUT_S + 30} s:\n" + "\n".join(
                                f"--- host {r.node}\n{r.text()}" for r in runs))
        (t0, line0), (t1, line1) = found
        # Host 0 serves the store: it sees rank 1's heartbeat stop.
        assert re.search(rf"^epmoe check: rank 0: rank 1 did not answer within {TIMEOUT_S} s "
                         r"in the .+ of ", line0), line0
        # Host 1 has lost the store on host 0: it names rank 0 and its node.
        assert re.search(rf"^epmoe check: rank 1: rank 0 on node 0 did not answer within "
                         rf"{TIMEOUT_S} s in the .+ the store at {re.escape(ADDR[0])}:\d+ has "
                         r"not answered for", line1), line1
        dt = (t0 - t_cut, t1 - t_cut)
        print(f"\ncut link, timeout {TIMEOUT_S} s: error on host 0 {dt[0]:.1f} s after the cut, "
              f"on host 1 {dt[1]:.1f} s\n  host 0: {line0}\n  host 1: {line1}")
        for side, d in enumerate(dt):
            assert TIMEOUT_S - 1 <= d <= TIMEOUT_S + 12, f"host {side}: {d:.1f} s after the cut"
    finally:
        pids += _netns_pids(hosts)
        for r in runs:
            r.kill()
        _sh(hosts, "down")
    left = [p for p in set(pids) if _alive(p)]
    assert not left, f"processes left over after down: {left}"
