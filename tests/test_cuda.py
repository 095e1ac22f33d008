"""The layer, its backends, from_pretrained and serving on NVIDIA GPUs (marked ``cuda``).

``tests/conftest.py`` skips these where ``torch.cuda.is_available()`` is false. On a
GPU machine, ``bash scripts/gpu_check.sh`` runs them (and more), or directly:

    python -m pytest -m cuda tests/test_cuda.py

One GPU: the layer at EP=1 with every backend against the CPU reference (fp32 and
bf16); grouped_mm chosen and called on the device; the ``low_latency`` layer
captured in a CUDA graph and replayed; ``from_pretrained`` onto the GPU against
transformers on the CPU; ``python -m epmoe serve`` answering like transformers'
greedy generate. Two GPUs or more: EP=2 over NCCL with every backend, and the
server on 2 ranks. The bodies take a ``device`` (and a process-group backend), so
that the same code also runs on the CPU: the GPU has not checked them yet.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multiproc import free_port, run_ranks
from test_layer_ep import case_inputs

import epmoe
from epmoe.hf.tiny import TINY_FAMILIES, save_tiny_checkpoint

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("alltoall", "allgather_reducescatter", "low_latency")
H, F_, E, K, T = 128, 256, 8, 2, 64  # hidden, intermediate, experts, top_k, tokens
CUDA0 = torch.device("cuda", 0)


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability(CUDA0) if gpus() else (0, 0)


needs_2_gpus = pytest.mark.skipif(gpus() < 2, reason="needs 2 GPUs (EP=2 over NCCL, one "
                                                      f"GPU per rank); found {gpus()}")


def layer_config(backend: str, dtype: str, **overrides) -> epmoe.MoEConfig:
    cap = dict(max_tokens_per_rank=T) if backend == "low_latency" else {}
    return epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E, top_k=K,
                           dtype=dtype, all2all_backend=backend, **cap, **overrides)


def tokens(cfg: epmoe.MoEConfig, seed: int = 1) -> torch.Tensor:
    """``[T, H]`` on the CPU, in the layer's dtype."""
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(cfg.dtype)


def reference_check(y: torch.Tensor, x: torch.Tensor, cfg: epmoe.MoEConfig):
    """``epmoe.compare_to_reference`` on the CPU (fp32: every token within 1e-5 of the
    output scale; bf16: twice the bf16 reference's own error plus one ulp)."""
    router, gate, up, down = epmoe.full_weights(cfg, seed=0)
    return epmoe.compare_to_reference(y.cpu(), x, router, gate, up, down, cfg)


# --------------------------------------------------------------------- one GPU, EP=1


def layer_vs_reference(device: torch.device, backend: str, dtype: str):
    cfg = layer_config(backend, dtype)
    layer = epmoe.ExpertParallelMoE(cfg, epmoe.single_process_state(device), seed=0)
    x = tokens(cfg)
    with torch.no_grad():
        y = layer(x.to(device))
    assert y.device == device and y.dtype == cfg.dtype and y.shape == x.shape
    return reference_check(y, x, cfg)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_reference(backend: str, dtype: str):
    result = layer_vs_reference(CUDA0, backend, dtype)
    assert result.ok, str(result)


def grouped_mm_calls(device: torch.device, backend: str,
                     monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, object]:
    """The layer's chosen expert implementation, how many times a bf16 forward called
    ``F.grouped_mm``, and the comparison with the reference."""
    real, calls = torch.nn.functional.grouped_mm, []

    def counting(*args, **kwargs):
        calls.append(args[0].device)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting)  # (epmoe calls F.grouped_mm)
    cfg = layer_config(backend, "bfloat16")
    layer = epmoe.ExpertParallelMoE(cfg, epmoe.single_process_state(device), seed=0)
    x = tokens(cfg, seed=2)
    with torch.no_grad():
        y = layer(x.to(device))
    assert all(d == device for d in calls), calls
    return layer.expert_impl, len(calls), reference_check(y, x, cfg)


@pytest.mark.parametrize("backend", ["alltoall", "low_latency"])
def test_grouped_mm_on_device(backend: str, monkeypatch: pytest.MonkeyPatch):
    if capability()[0] not in (9, 10):
        pytest.skip(f"expert_impl='auto' picks grouped_mm only where torch runs its fused "
                    f"kernel (bf16 on sm90/sm100); this GPU is sm{capability()[0]}"
                    f"{capability()[1]}")
    impl, calls, result = grouped_mm_calls(CUDA0, backend, monkeypatch)
    assert impl == "grouped_mm"  # expert_impl="auto" on CUDA in bf16 (choose_expert_impl)
    assert calls == 2, "two grouped products per forward (gate/up, then down)"
    assert result.ok, str(result)


def graph_replays(device: torch.device, replays: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """Capture the low_latency layer's forward in a CUDA graph, then for new tokens
    copied into the static input: (x, the replay's output, an eager forward's output)."""
    cfg = layer_config("low_latency", "bfloat16")
    layer = epmoe.ExpertParallelMoE(cfg, epmoe.single_process_state(device), seed=0)
    static_x = tokens(cfg, seed=10).to(device)
    out = []
    with torch.no_grad():
        side = torch.cuda.Stream(device)  # warm up off the default stream (torch's recipe)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for i in range(replays):
            x = tokens(cfg, seed=20 + i)
            static_x.copy_(x.to(device))
            graph.replay()
            replayed = static_y.clone()
            out.append((x, replayed.cpu(), layer(x.to(device)).cpu()))
    return out


def test_low_latency_cuda_graph():
    if capability()[0] not in (9, 10):
        pytest.skip(f"torch's grouped_mm runs without a host sync (capturable) only in bf16 "
                    f"on sm90/sm100; this GPU is sm{capability()[0]}{capability()[1]}")
    cfg = layer_config("low_latency", "bfloat16")
    for x, replayed, eager in graph_replays(CUDA0):
        assert torch.equal(replayed, eager), (replayed - eager).abs().max()
        result = reference_check(replayed, x, cfg)
        assert result.ok, str(result)


def logits_vs_transformers(family: str, device: torch.device, out_dir: Path) -> float:
    """Largest |logit difference| of ``from_pretrained`` on ``device`` against transformers
    on the CPU, both in fp32, for a tiny random checkpoint of ``family``."""
    transformers = pytest.importorskip("transformers")
    path = save_tiny_checkpoint(family, out_dir, seed=1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    model = epmoe.from_pretrained(path, epmoe.single_process_state(device), dtype="float32")
    assert all(p.device == device for p in model.parameters())
    with torch.no_grad():
        got = model(ids.to(device)).logits.cpu()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        want = hf.eval()(ids).logits
    return (got - want).abs().max().item()


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_from_pretrained_on_cuda(family: str, tmp_path: Path):
    assert logits_vs_transformers(family, CUDA0, tmp_path / family) <= 1e-4


# --------------------------------------------------------------- two GPUs, EP=2 over NCCL

# cases of tests/test_layer_ep.py: plain, bf16, two families' routers, all tokens to one expert
EP_CASES = ("base", "bf16", "deepseek_v3", "gpt_oss", "one_expert_top2", "deepseek_v3_bf16")


def _ep_worker(pg_backend: str) -> dict:
    """One rank: every EP_CASES case with every dispatch backend; outputs on the CPU."""
    state = epmoe.init_distributed(backend=pg_backend, timeout_s=60)
    assert state.backend == pg_backend
    out = {}
    for backend in BACKENDS:
        for name in EP_CASES:
            cfg, x_all, counts, weights = case_inputs(name, state.world_size, backend)
            start = sum(counts[: state.rank])
            x = x_all[start : start + counts[state.rank]].to(state.device)
            layer = epmoe.ExpertParallelMoE(cfg, state, seed=None)
            layer.load_full_weights(**weights)
            with torch.no_grad():
                y1, y2 = layer(x), layer(x)
            out[(backend, name)] = dict(y=y1.cpu(), bitwise=torch.equal(y1, y2),
                                        device=str(y1.device))
    return out


@functools.cache
def ep_results(pg_backend: str) -> list[dict]:
    return run_ranks(_ep_worker, 2, pg_backend, deadline_s=300)


def check_ep(per_rank: list[dict], backend: str) -> None:
    for name in EP_CASES:
        cfg, x, counts, weights = case_inputs(name, 2, backend)
        got = [r[(backend, name)] for r in per_rank]
        y = torch.cat([g["y"] for g in got])
        result = epmoe.compare_to_reference(y, x, **weights, config=cfg, splits=counts)
        assert result.ok, f"{name}: {result}"
        assert all(g["bitwise"] for g in got), f"{name}: a second forward differs"


@needs_2_gpus
@pytest.mark.parametrize("backend", BACKENDS)
def test_ep2_nccl_matches_reference(backend: str):
    per_rank = ep_results("nccl")
    assert [r[(backend, "base")]["device"] for r in per_rank] == ["cuda:0", "cuda:1"]
    check_ep(per_rank, backend)


# ----------------------------------------------------------------------- serving smoke

NAME = "tiny-qwen3"


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    """tests/test_serve_live.py's model: fp32 tiny Qwen3-MoE, byte tokenizer, chat template."""
    from test_serve_live import TEMPLATE

    path = save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("cuda_serve") / "m",
                                seed=3)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


class GpuServer:
    """``python -m epmoe serve`` on ``world`` ranks without ``--force-cpu`` (torchrun's
    environment for 2: NCCL and a GPU per rank; one process: EP=1 on cuda:0)."""

    def __init__(self, model: Path, world: int, log_dir: Path) -> None:
        import httpx

        self.port, master = free_port(), free_port()
        self.procs, self.logs = [], []
        for rank in range(world):
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
            if world > 1:
                env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                           LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(master))
            cmd = [sys.executable, "-m", "epmoe", "serve", "--model", str(model), "--port",
                   str(self.port), "--served-model-name", NAME, "--kv-cache-gb", "0.25",
                   "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--timeout", "60"]
            log = open(log_dir / f"serve_rank{rank}.log", "w+")  # noqa: SIM115 (closed in stop)
            self.logs.append(log)
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                               stderr=subprocess.STDOUT))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        self.stop()
        raise AssertionError("the server did not start:\n" + self.text())

    def stop(self) -> list[int | None]:
        """SIGTERM to every rank (as torchrun forwards it); their exit codes."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [p.returncode for p in self.procs]

    def text(self) -> str:
        out = []
        for rank, log in enumerate(self.logs):
            log.flush()
            log.seek(0)
            out.append(f"--- rank {rank} ---\n{log.read()[-4000:]}")
        return "\n".join(out)


def serve_smoke(model: Path, world: int, log_dir: Path) -> None:
    """A completion and a streamed chat equal transformers' greedy tokens (CPU, fp32);
    SIGTERM then stops every rank with exit code 0."""
    import openai
    from test_serve_live import greedy, text_of

    server = GpuServer(model, world, log_dir)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                          timeout=120)
        prompt = "Expert parallelism"
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == text_of(greedy(model, list(prompt.encode()), 8))
        messages = [{"role": "user", "content": "Hi there"}]
        stream = c.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        chat_prompt = "<user>Hi there\n<assistant>"
        assert text == text_of(greedy(model, list(chat_prompt.encode()), 6))
    finally:
        codes = server.stop()
    assert codes == [0] * world, server.text()


@pytest.mark.parametrize("world", [1, 2])
def test_serve_smoke(world: int, tiny_qwen3: Path, tmp_path: Path):
    pytest.importorskip("openai")
    pytest.importorskip("httpx")
    if gpus() < world:
        pytest.skip(f"needs {world} GPUs (one per rank); found {gpus()}")
    serve_smoke(tiny_qwen3, world, tmp_path)
