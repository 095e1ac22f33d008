"""``python -m epmoe serve`` on 2 ranks, driven through HTTP with the ``openai`` client.

One server (two processes started as torchrun would, fp32 tiny Qwen3-MoE with a
byte tokenizer and a chat template) answers completions, chat, streaming,
seeded sampling, stop strings, bad input, a client that disconnects and 24
concurrent requests of different lengths, each of which must equal
transformers' greedy tokens of its prompt alone. Idle, the ranks block: their
CPU time over a quiet second stays near zero. A second server loses a rank
mid-request: the request fails with 503, and rank 0 exits non-zero naming rank 1.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multiproc import free_port

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from epmoe.hf.tiny import save_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-qwen3"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("live") / "m", seed=3)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


class Server:
    """Two ranks of ``python -m epmoe serve`` with torchrun's environment; rank 0 on HTTP."""

    def __init__(self, model: Path, *args: str, world: int = 2, timeout: float = 20) -> None:
        self.port, master = free_port(), free_port()
        self.procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(master), OMP_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "epmoe", "serve", "--model", str(model), "--port",
                   str(self.port), "--served-model-name", NAME, "--force-cpu", "--timeout",
                   str(timeout), "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                   *args]
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not start:\n" + self.logs())

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    def logs(self) -> str:
        out = []
        for rank, p in enumerate(self.procs):
            if p.poll() is None:
                p.kill()
            out.append(f"--- rank {rank} ---\n{p.stdout.read()}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir)
    yield s
    s.stop()
    assert [p.returncode for p in s.procs] == [0, 0], s.logs()


@functools.cache
def _hf(path: str):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf


def greedy(path: Path, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    return _hf(str(path)).generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=n)[0, len(ids):].tolist()


def text_of(ids: list[int]) -> str:
    """The byte tokenizer's decode (token i is byte i; specials are not shown)."""
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_models_health_and_completion(server, model_dir):
    c = server.client()
    assert [m.id for m in c.models.list().data] == [NAME]
    prompt = "Expert parallelism"
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=7, temperature=0,
                             extra_body={"ignore_eos": True})
    want = greedy(model_dir, list(prompt.encode()), 7)
    assert r.choices[0].text == text_of(want) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 7)
    # token ids as the prompt; the stream's pieces join to the same text, usage last
    chunks = list(c.completions.create(model=NAME, prompt=list(prompt.encode()), max_tokens=7,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text_of(want)
    assert chunks[-1].usage.completion_tokens == 7


def test_chat_and_its_stream(server, model_dir):
    c = server.client()
    messages = [{"role": "user", "content": "Hi there"}]
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    prompt = "<user>Hi there\n<assistant>"
    want = text_of(greedy(model_dir, list(prompt.encode()), 5))
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(model=NAME, messages=messages, max_tokens=5,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    deltas = [ch.choices[0].delta for ch in stream if ch.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == want


def test_24_concurrent_requests_each_equal_their_greedy_reference(server, model_dir):
    c = server.client(timeout=120)
    prompts = [[(i * 11 + j * 5 + 1) % 256 for j in range(2 + (i * 7) % 40)] for i in range(24)]
    lengths = [1 + (i * 5) % 12 for i in range(24)]

    def one(i: int) -> list[int]:
        stream = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i],
                                      temperature=0, stream=True,
                                      extra_body={"ignore_eos": True},
                                      stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == lengths[i]
        return "".join(ch.choices[0].text for ch in chunks if ch.choices)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        got = list(pool.map(one, range(24)))
    for i in range(24):
        assert got[i] == text_of(greedy(model_dir, prompts[i], lengths[i])), i
    metrics = httpx.get(server.url + "/metrics").text
    running = re.findall(r'^epmoe:num_requests_running\{rank="(\d)"\} (\S+)', metrics, re.M)
    assert sorted(r for r, _ in running) == ["0", "1"], metrics[:2000]


def test_seeded_sampling_repeats_and_stop_strings(server):
    c = server.client()

    def draw(seed: int) -> str:
        return c.completions.create(model=NAME, prompt="Once upon", max_tokens=12,
                                    temperature=1.0, top_p=0.9, seed=seed,
                                    extra_body={"ignore_eos": True, "top_k": 50}
                                    ).choices[0].text

    a, b, other = draw(1), draw(1), draw(2)
    assert a == b and a != other
    full = c.completions.create(model=NAME, prompt="abc", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    cut = next(i for i in range(2, len(full)) if full[i] != "\ufffd")  # a whole character
    r = c.completions.create(model=NAME, prompt="abc", max_tokens=12, temperature=0,
                             stop=[full[cut]], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(full[cut])]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x" * 300, "max_tokens": 4}, "prompt"),
    ({"prompt": "x", "model": "other"}, "model"),
])
def test_bad_completions_get_4xx_naming_the_field(server, body, field):
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, **body}, timeout=10)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert field in err["message"] or err.get("param") == field, err


def test_bad_chat_and_broken_json_then_still_serving(server):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": NAME, "messages": "hello"}, timeout=10)
    assert r.status_code == 400 and "messages" in r.text
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "x", "prompt": ',
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "JSON" in r.text
    r = server.client().completions.create(model=NAME, prompt="ok", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def _kv_used(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(r'^epmoe:kv_cache_blocks_used\{[^}]*\} (\S+)',
                                            text, re.M))


def test_a_client_that_disconnects_frees_its_cache(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": NAME, "prompt": "long", "max_tokens": 200,
                            "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one token came: hang up
    deadline = time.monotonic() + 10
    while _kv_used(server.url) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _kv_used(server.url) == 0


def test_idle_ranks_do_not_spin(server):
    import resource  # noqa: F401 (Linux: /proc gives the CPU times)

    def cpu_s(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    time.sleep(1.0)  # let the last request's steps end
    before = [cpu_s(p.pid) for p in server.procs]
    time.sleep(3.0)
    used = [cpu_s(p.pid) - b for p, b in zip(server.procs, before, strict=True)]
    assert max(used) < 0.3, used  # seconds of CPU over 3 idle seconds, per rank


def test_a_killed_rank_fails_requests_with_503_and_stops_the_server(model_dir):
    s = Server(model_dir, timeout=10)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, s.url + "/v1/completions", timeout=60,
                                  json={"model": NAME, "prompt": "a", "max_tokens": 200,
                                        "ignore_eos": True})
            time.sleep(1.0)
            s.procs[1].kill()
            r = pending.result()
        assert r.status_code == 503, r.text
        assert s.procs[0].wait(timeout=30) != 0
        log = s.logs()
        assert re.search(r"rank 1", log), log
    finally:
        s.stop()
