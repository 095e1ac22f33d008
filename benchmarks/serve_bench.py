"""Load generator for OpenAI-compatible servers, measured like ``vllm bench serve``.

    python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000 \\
        --tokenizer benchmarks/.serving_model --num-prompts 32 --input-len 128 \\
        --output-len 64 --request-rate inf --out result.json
    # transformers serve: string prompts only, and no ignore_eos field (422)
    python benchmarks/serve_bench.py ... --eos-mode generation_config

Client side only (asyncio + httpx). Streams /v1/completions and times every
server-sent chunk. Definitions are vLLM's (benchmarks/serve.py):

    TTFT  send -> first token's chunk (one with choices; a closing chunk with
          only finish_reason and no text is not a token's)
    ITL   gaps between consecutive token chunks, pooled over all requests
    TPOT  (E2EL - TTFT) / (output tokens - 1), per request
    E2EL  send -> end of stream
    output tokens: usage.completion_tokens (stream_options.include_usage) when
        the server sends it, else the number of token chunks

Prompts: random words of the tokenizer's vocabulary, joined so that the text
tokenizes to exactly ``input_len`` tokens (each chosen token is a whole
space-prefixed word that round-trips alone), sent as text (``--prompt-format
text``, every server takes it) or as token ids (``ids``, vLLM's exact path).

Fixed output length (``--eos-mode``): ``field`` sends ``ignore_eos: true`` (vLLM,
SGLang, epmoe); ``generation_config`` sends transformers serve's
``generation_config`` JSON with min_new_tokens = max_new_tokens = output_len;
``none`` sends neither (outputs may stop early; the report counts what came).

Arrivals: Poisson at ``--request-rate`` requests/s (``inf``: all at t=0),
capped by ``--max-concurrency`` in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

EOS_MODES = ("field", "generation_config", "none")
PROMPT_FORMATS = ("text", "ids")


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int  # what the client built
    output_tokens: int  # server's usage when sent, else token chunks
    ttft_s: float = 0.0
    e2el_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    server_prompt_tokens: int | None = None  # usage.prompt_tokens, to check the prompt
    error: str = ""


def word_tokens(tokenizer) -> list[int]:
    """Ids of tokens that are one space-prefixed word and encode back to themselves:
    any sequence of them joins into text of exactly that many tokens."""
    special = set(tokenizer.all_special_ids)
    out = []
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        text = tokenizer.decode([tid])
        if (len(text) > 1 and text[0] == " " and text[1:].isalpha()
                and tokenizer.encode(text, add_special_tokens=False) == [tid]):
            out.append(tid)
    if len(out) < 50:
        raise ValueError(f"tokenizer has only {len(out)} whole-word tokens; need 50")
    return out


def make_prompts(tokenizer, num: int, input_len: int, seed: int) -> list[list[int]]:
    """``num`` random prompts of ``input_len`` token ids, each checked to round-trip
    through text (so text and id prompts are the same prompt)."""
    rng = random.Random(seed)
    pool = word_tokens(tokenizer)
    prompts = []
    for _ in range(num):
        ids = [rng.choice(pool) for _ in range(input_len)]
        text = tokenizer.decode(ids)
        if tokenizer.encode(text, add_special_tokens=False) != ids:
            raise RuntimeError("a prompt did not round-trip through its text")
        prompts.append(ids)
    return prompts


def request_body(model: str, prompt: list[int] | str, output_len: int, eos_mode: str,
                 stream_usage: bool) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "stream": True}
    if stream_usage:
        body["stream_options"] = {"include_usage": True}
    if eos_mode == "field":
        body["ignore_eos"] = True
    elif eos_mode == "generation_config":
        # transformers serve rejects unknown fields (422) but takes a whole
        # GenerationConfig as JSON; min_new_tokens masks EOS until output_len.
        body["generation_config"] = json.dumps({"max_new_tokens": output_len,
                                                "min_new_tokens": output_len,
                                                "do_sample": False})
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict,
                      prompt_tokens: int) -> RequestResult:
    """Send one streaming completion; time each chunk that carries text."""
    t0 = time.perf_counter()
    chunk_times: list[float] = []
    usage = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                return RequestResult(False, prompt_tokens, 0, error=f"{resp.status_code} {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                msg = json.loads(data)
                if "error" in msg:
                    return RequestResult(False, prompt_tokens, 0, error=str(msg["error"])[:300])
                if msg.get("usage"):
                    usage = msg["usage"]
                # A token's chunk, as in vLLM's client: one with choices, less a
                # closing chunk that only carries finish_reason (transformers serve).
                # Its text may be empty (a detokenizer holding a partial character).
                choices = msg.get("choices") or []
                if any(c.get("text") for c in choices) or (
                        choices and not any(c.get("finish_reason") for c in choices)):
                    chunk_times.append(now)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(False, prompt_tokens, 0, error=f"{type(e).__name__}: {e}"[:300])
    end = time.perf_counter()
    if not chunk_times:
        return RequestResult(False, prompt_tokens, 0, error="no token in the stream")
    n_out = usage["completion_tokens"] if usage else len(chunk_times)
    return RequestResult(True, prompt_tokens, n_out, ttft_s=chunk_times[0] - t0, e2el_s=end - t0,
                         itl_s=[b - a for a, b in itertools.pairwise(chunk_times)],
                         server_prompt_tokens=usage.get("prompt_tokens") if usage else None)


def stats_ms(values: list[float], percentiles=(50, 90, 99)) -> dict:
    if not values:
        return {"mean": None, "median": None, **{f"p{p}": None for p in percentiles}}
    ordered = sorted(values)

    def pct(p: float) -> float:  # linear interpolation, as numpy.percentile
        k = (len(ordered) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": 1e3 * statistics.fmean(ordered), "median": 1e3 * statistics.median(ordered),
            **{f"p{p}": 1e3 * pct(p) for p in percentiles}}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.e2el_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "server_prompt_tokens": sorted({r.server_prompt_tokens for r in ok
                                        if r.server_prompt_tokens is not None}),
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "ttft_ms": stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms([g for r in ok for g in r.itl_s]),
        "e2el_ms": stats_ms([r.e2el_s for r in ok]),
    }


def format_table(s: dict) -> str:
    def f(x) -> str:
        return "-" if x is None else f"{x:.2f}"

    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f(s["duration_s"])),
            ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f(s["request_throughput"])),
            ("Output token throughput (tok/s)", f(s["output_throughput"])),
            ("Total token throughput (tok/s)", f(s["total_token_throughput"]))]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                      ("e2el_ms", "E2EL")):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize() if stat != 'p99' else 'P99'} {name} (ms)",
                         f(s[key][stat])))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v:>12}" for k, v in rows)


async def run(base_url: str, model: str, prompts: list, output_len: int, request_rate: float,
              max_concurrency: int | None, eos_mode: str, stream_usage: bool, seed: int,
              timeout_s: float) -> tuple[list[RequestResult], float]:
    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed + 1)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(prompts) + 1,
                          max_keepalive_connections=max_concurrency or len(prompts) + 1)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def limited(prompt, n_tokens):
            body = request_body(model, prompt, output_len, eos_mode, stream_usage)
            if gate is None:
                return await one_request(client, url, body, n_tokens)
            async with gate:
                return await one_request(client, url, body, n_tokens)

        tasks = []
        t_start = time.perf_counter()
        for i, (prompt, n_tokens) in enumerate(prompts):
            tasks.append(asyncio.create_task(limited(prompt, n_tokens)))
            if request_rate != float("inf") and i < len(prompts) - 1:
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t_start


def served_model(base_url: str) -> str:
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def main(base_url: str = "http://127.0.0.1:8000", tokenizer: str = "benchmarks/.serving_model",
         model: str | None = None, num_prompts: int = 32, input_len: int = 128,
         output_len: int = 64, request_rate: float = float("inf"),
         max_concurrency: int | None = None, eos_mode: str = "field",
         prompt_format: str = "text", stream_usage: bool = True, warmup: int = 1,
         seed: int = 0, timeout_s: float = 1800.0, label: str = "",
         out: str | None = None, quiet: bool = False) -> dict:
    """Run the benchmark; return (and write to ``out``) the summary dict."""
    from transformers import AutoTokenizer

    if eos_mode not in EOS_MODES:
        raise ValueError(f"eos_mode must be one of {EOS_MODES}, got {eos_mode!r}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = make_prompts(tok, num_prompts + warmup, input_len, seed)
    prompts = [(p if prompt_format == "ids" else tok.decode(p), len(p)) for p in ids]
    model = model or served_model(base_url)
    args = dict(base_url=base_url, model=model, output_len=output_len,
                request_rate=request_rate, max_concurrency=max_concurrency,
                eos_mode=eos_mode, stream_usage=stream_usage, seed=seed, timeout_s=timeout_s)
    if warmup:  # not timed: first-request costs (compilation, lazy loads, thread pools)
        warm, _ = asyncio.run(run(prompts=prompts[:warmup], **{**args, "output_len": 4}))
        if not all(r.ok for r in warm):
            raise RuntimeError(f"warm-up request failed: {warm[0].error}")
    results, duration = asyncio.run(run(prompts=prompts[warmup:], **args))
    summary = summarize(results, duration)
    summary["config"] = dict(label=label, tokenizer=str(tokenizer), num_prompts=num_prompts,
                             input_len=input_len, prompt_format=prompt_format, warmup=warmup,
                             **{k: (str(v) if v == float("inf") else v)
                                for k, v in args.items()})
    summary["per_request"] = [
        {k: v for k, v in asdict(r).items() if k != "itl_s"} for r in results]
    if not quiet:
        title = f" Serving benchmark {label} ".center(56, "=")
        print(title, format_table(summary), "=" * len(title), sep="\n")
        if summary["failed"]:
            print("errors:", *summary["errors"], sep="\n  ")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--tokenizer", default="benchmarks/.serving_model",
                   help="tokenizer folder (the served checkpoint) to build prompts with")
    p.add_argument("--model", default=None, help="model name sent; default: first of /v1/models")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s; inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--eos-mode", choices=EOS_MODES, default="field",
                   help="how to ask for exactly output-len tokens (see the docstring)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="text")
    p.add_argument("--no-stream-usage", dest="stream_usage", action="store_false",
                   help="omit stream_options.include_usage; output tokens counted as chunks")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests sent first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per-request timeout")
    p.add_argument("--label", default="")
    p.add_argument("--out", default=None, help="JSON file for the summary")
    p.add_argument("--quiet", action="store_true", help="print no table")
    main(**vars(p.parse_args()))
