"""Serve a Hugging Face MoE checkpoint over an OpenAI-compatible HTTP API, expert-parallel.

    python -m epmoe serve --model DIR                                   # one process, EP=1
    torchrun --nproc_per_node=2 -m epmoe serve --model DIR --port 8000  # EP=2, 2 DP ranks
    torchrun --nnodes=2 --nproc_per_node=1 --rdzv-endpoint=HOST:29500 -m epmoe serve --model DIR

Every rank holds the dense layers and a KV cache of its own and serves its own
requests (data-parallel attention); the experts are shared out between the
ranks (expert parallelism), whose MoE layers meet in every step. Only rank 0
listens for HTTP: it spreads the requests over the ranks by least load. The
API is vLLM's (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, ``/metrics``); the ``openai`` client works unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from pathlib import Path

from ..config import parse_dtype
from ..parallel_state import destroy_distributed, init_distributed

BACKENDS = ("alltoall", "allgather", "low_latency")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="address rank 0 listens on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the "
                                                 "checkpoint's)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name of the API (default: --model as given)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + generated tokens per sequence (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="sequences in one rank's running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens in one rank's step; longer prompts are prefilled in chunks")
    p.add_argument("--kv-cache-gb", type=float, default=4.0,
                   help="KV-cache memory per rank, GiB (requests wait for room; none is "
                        "preempted)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="requests in flight per rank beyond --max-num-seqs; the server "
                        "answers 429 past ranks x (max-num-seqs + max-waiting)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--all2all-backend", default="alltoall", choices=BACKENDS,
                   help="how the MoE layers dispatch and combine")
    p.add_argument("--num-redundant-experts", type=int, default=0,
                   help="extra expert copies for load balancing (see the README)")
    p.add_argument("--rebalance-interval", type=int, default=0,
                   help="re-place the experts every N steps from their load (0: never)")
    p.add_argument("--placement", default="linear", choices=["linear", "round_robin"])
    p.add_argument("--no-shm", action="store_true",
                   help="all-to-alls through gloo even between CPU ranks of one host "
                        "(default: shared memory, see docs/serving.md)")
    p.add_argument("--force-cpu", action="store_true", help="CPU and gloo even with GPUs")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds any collective may take before a rank is declared failed")


def _eos_ids(model_dir: Path, hf_config) -> tuple[int, ...]:
    eos = None
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _tokenizer(model_dir: Path):
    if not ((model_dir / "tokenizer.json").is_file() or
            (model_dir / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def check_options(model_dir: Path, port: int, max_num_seqs: int, max_num_batched_tokens: int,
                  kv_cache_gb: float, max_waiting: int, num_redundant_experts: int,
                  rebalance_interval: int, dtype: str | None) -> None:
    """Bad flags fail on every rank before any process group exists."""
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no config.json there (not a model directory)")
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    for flag, v in (("--max-num-seqs", max_num_seqs),
                    ("--max-num-batched-tokens", max_num_batched_tokens)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if max_num_batched_tokens < max_num_seqs:
        raise ValueError(f"--max-num-batched-tokens ({max_num_batched_tokens}) must be >= "
                         f"--max-num-seqs ({max_num_seqs})")
    if not kv_cache_gb > 0:
        raise ValueError(f"--kv-cache-gb must be > 0, got {kv_cache_gb}")
    for flag, v in (("--max-waiting", max_waiting),
                    ("--num-redundant-experts", num_redundant_experts),
                    ("--rebalance-interval", rebalance_interval)):
        if v < 0:
            raise ValueError(f"{flag} must be >= 0, got {v}")
    if dtype is not None:
        parse_dtype(dtype)


def main(model: str, host: str, port: int, dtype: str | None, served_model_name: str | None,
         max_model_len: int | None, max_num_seqs: int, max_num_batched_tokens: int,
         kv_cache_gb: float, max_waiting: int, api_key: str | None, all2all_backend: str,
         num_redundant_experts: int, rebalance_interval: int, placement: str,
         no_shm: bool, force_cpu: bool, timeout: float) -> int:
    from ..hf.loading import from_pretrained
    from ..serve.config import EngineConfig
    from ..serve.engine import Engine
    from ..serve.sync import serve_loop

    model_dir = Path(model)
    check_options(model_dir, port, max_num_seqs, max_num_batched_tokens, kv_cache_gb,
                  max_waiting, num_redundant_experts, rebalance_interval, dtype)
    state = init_distributed(force_cpu=force_cpu, timeout_s=timeout)
    try:
        options = dict(all2all_backend=all2all_backend)
        if num_redundant_experts:
            options["num_redundant_experts"] = num_redundant_experts
        if rebalance_interval:
            options.update(rebalance_interval=rebalance_interval, load_window=rebalance_interval)
        m = from_pretrained(model_dir, state, dtype=dtype, placement=placement,
                            moe_options=options)
        limit = max_model_len or getattr(m.config, "max_position_embeddings", None)
        if not limit:
            raise ValueError("the model's config has no max_position_embeddings: give "
                             "--max-model-len")
        config = EngineConfig(max_model_len=int(limit), max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              kv_cache_bytes=int(kv_cache_gb * (1 << 30)),
                              max_waiting=max_waiting, pack_weights=not rebalance_interval,
                              shm_all_to_all=not no_shm)
        engine = Engine(m, config, _eos_ids(model_dir, m.config), state.device)
        stop = threading.Event()
        # SIGINT/SIGTERM (torchrun sends them to every rank): rank 0 orders every rank to
        # stop after the current step; the others keep stepping until that order comes
        # (or until rank 0 is gone, which the next collective reports).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if state.rank != 0:
            serve_loop(engine, state)
            return 0
        return _serve_rank0(engine, state, m, model_dir, host, port,
                            served_model_name or model, api_key, stop)
    finally:
        destroy_distributed()


def _serve_rank0(engine, state, m, model_dir: Path, host: str, port: int, name: str,
                 api_key: str | None, stop: threading.Event) -> int:
    from ..serve.api import build_app, serve_http
    from ..serve.client import EngineClient
    from ..serve.sync import serve_loop

    c = engine.config
    client = EngineClient(max_pending=state.world_size * (c.max_num_seqs + c.max_waiting))
    app = build_app(client, _tokenizer(model_dir), name, c.max_model_len,
                    m.config.get_text_config().vocab_size, api_key=api_key, eos_token_ids=tuple(
                        engine.eos_token_ids))
    failure = []

    def run_engine() -> None:
        try:
            serve_loop(engine, state, client, stop)
        except BaseException as e:  # noqa: BLE001 (a failed peer: reported, then exit 3)
            failure.append(e)
            client.fail_all(f"the engine stopped: {e}")
        finally:
            stop.set()

    thread = threading.Thread(target=run_engine, name="epmoe-engine", daemon=True)
    thread.start()
    moe = engine.lockstep.layers[0].config
    print(f"epmoe serve: {model_dir} ({m.config.model_type}) as {name!r} on "
          f"http://{host}:{port}/v1 - EP={state.ep_size} over {state.world_size} rank(s), "
          f"{state.backend or 'one process'} on {state.device.type}, "
          f"{str(moe.dtype).removeprefix('torch.')}, {len(engine.lockstep.layers)} MoE layers "
          f"of {moe.num_experts} experts top-{moe.top_k}; max_model_len {c.max_model_len}, "
          f"KV cache {engine.cache.num_blocks} blocks of {c.block_size} tokens per rank",
          flush=True)
    asyncio.run(serve_http(app, host, port, stop))  # until SIGINT/SIGTERM or the engine stops
    stop.set()
    thread.join(timeout=state.timeout_s + 5)
    if failure:
        print(f"python -m epmoe serve: {failure[0]}", file=sys.stderr, flush=True)
        return 3
    return 0
