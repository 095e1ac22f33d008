"""The HTTP front of ``python -m epmoe serve`` against a fake engine.

The fake engine is a thread that does what the real one does at the client's
boundary: it drains ``client.take_commands`` and answers each request with
``client.deliver``, one token per step. Its reply is fixed bytes of the
byte-level tiny tokenizer (token i is byte i, EOS 257), with characters of
two, three and four bytes, so that most steps end inside a character. The
servers are real (uvicorn on 127.0.0.1, a port picked by the OS) and are
called with the ``openai`` client, with raw httpx for bad inputs, and with
hypothesis bodies generated from the app's OpenAPI schema (a fuzz: never a 5xx).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epmoe.hf.tiny import _byte_tokenizer
from epmoe.placement import expert_map  # noqa: E402
from epmoe.serve.api import build_app, serve_http
from epmoe.serve.client import EngineClient, EngineStats
from epmoe.serve.detokenize import IncrementalDetokenizer, TextStream
from epmoe.serve.types import Request, StepOutput

pytestmark = pytest.mark.timeout(60)

MODEL = "tiny-byte"
VOCAB, EOS = 259, 257
MAX_MODEL_LEN = 256
REPLY = "Hé€🙂 lorem END ipsum µ"  # 1-, 2-, 3-, 4-byte characters; one byte per token
REPLY_IDS = list(REPLY.encode()) + [EOS]
TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _tokenizer():
    tok = _byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


TOK = _tokenizer()


class FakeEngine:
    """Answers every request with REPLY_IDS, cycled, one token per step, honouring
    max_tokens, EOS / ignore_eos, stop_token_ids and aborts. A prompt that starts
    with ``hold`` gets no token until it is aborted; one that starts with ``huge`` is
    refused on arrival."""

    def __init__(self, client: EngineClient, step_s: float = 0.001) -> None:
        self.client, self.step_s = client, step_s
        self.commands: list[tuple[str, str]] = []  # ("add" | "abort", request id)
        self.requests: dict[str, Request] = {}
        self._active: dict[str, list] = {}  # id -> [request, tokens given]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeEngine:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for kind, x in self.client.take_commands(None if self._active else 0.02):
                if kind == "add":
                    self.commands.append(("add", x.request_id))
                    self.requests[x.request_id] = x
                    self._active[x.request_id] = [x, 0]
                else:
                    self.commands.append(("abort", x))
                    self._active.pop(x, None)
            outs = []
            for rid, state in list(self._active.items()):
                req, i = state
                if bytes(req.prompt_ids[:4]) == b"hold":
                    continue
                if bytes(req.prompt_ids[:4]) == b"huge":  # as Engine.add refuses a request
                    outs.append(StepOutput(rid, (), "error", len(req.prompt_ids),  # that can
                                           "exceeds the KV cache"))  # never fit its cache
                    del self._active[rid]
                    continue
                tok, p = REPLY_IDS[i % len(REPLY_IDS)], req.params
                state[1] = i + 1
                finish = ("stop" if (tok == EOS and not p.ignore_eos) or tok in p.stop_token_ids
                          else "length" if i + 1 >= p.max_tokens else None)
                outs.append(StepOutput(rid, (tok,), finish, len(req.prompt_ids)))
                if finish:
                    del self._active[rid]
            self.client.deliver(outs)
            time.sleep(self.step_s if self._active else 0)

    def wait_for(self, command: tuple[str, str] | str, timeout: float = 5.0) -> None:
        """Until ``command`` (or any command of that kind) has come in."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(c == command or c[0] == command for c in self.commands):
                return
            time.sleep(0.01)
        raise AssertionError(f"the engine never got {command}; it got {self.commands}")


class Server:
    """A fake engine and the app under uvicorn, in threads; stops on leaving."""

    def __init__(self, max_pending: int = 64, api_key: str | None = None,
                 should_stop=None) -> None:
        self.client = EngineClient(max_pending=max_pending)
        self.engine = FakeEngine(self.client)
        self.app = build_app(self.client, TOK, MODEL, MAX_MODEL_LEN, VOCAB, api_key=api_key,
                             eos_token_ids=(EOS,))
        self.stop = threading.Event()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        stop = (lambda: self.stop.is_set() or should_stop()) if should_stop else self.stop
        run = serve_http(self.app, sock=sock, should_stop=stop)
        self.thread = threading.Thread(target=asyncio.run, args=(run,), daemon=True)

    def __enter__(self) -> Server:
        self.engine.__enter__()
        self.thread.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(self.url + "/health", timeout=1)
                return self
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        self.engine.__exit__()
        assert not self.thread.is_alive(), "the server did not stop"

    def openai(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


def _decode(ids: list[int]) -> str:
    return TOK.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- detokenization, pure


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_characters="\ufffd"), max_size=12),
       cuts=st.lists(st.integers(1, 4), max_size=40))
def test_incremental_detokenizer_joins_to_the_full_decode(text, cuts):
    ids = list(text.encode()) + [EOS] + list(text.encode())  # a special id in the middle
    d, pieces, i = IncrementalDetokenizer(TOK), [], 0
    for k in cuts + [len(ids)]:
        pieces.append(d.push(ids[i:i + k]))
        i += k
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert "".join(pieces) + d.finish() == _decode(ids) == text + text


def test_incremental_detokenizer_invalid_bytes():
    ids = list(b"a\xff") + list("€".encode())[:2] + list(b"b")  # never valid; cut at the end
    d = IncrementalDetokenizer(TOK)
    assert "".join(d.push([i]) for i in ids) + d.finish() == _decode(ids)


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet="ab€é", max_size=16),
       stops=st.lists(st.text(alphabet="ab€é", min_size=1, max_size=3), max_size=2),
       step=st.integers(1, 3))
def test_text_stream_cuts_at_the_first_stop_string(text, stops, step):
    ids = list(text.encode())
    s, pieces = TextStream(TOK, stops), []
    for i in range(0, len(ids) + 1, step):
        piece, stopped = s.push(ids[i:i + step], finished=i + step >= len(ids))
        pieces.append(piece)
        if stopped:
            break
    assert "".join(pieces) == s.text and text.startswith(s.text)
    assert not any(x in s.text for x in stops)  # nothing past a stop string is sent
    if s.stopped:  # cut just before a stop string
        assert any(text.startswith(x, len(s.text)) for x in stops)
    else:
        assert s.text == text
    if step == 1 and stops and len(stops[0]) == 1:  # char-wise arrival: the first to complete
        ends = [(text.find(x) + len(x), text.find(x)) for x in stops if x in text]
        assert len(s.text) == (min(ends)[1] if ends else len(text))


# ---------------------------------------------------------------- the openai client


def test_models_health_and_completion(server):
    c = server.openai()
    models = c.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(server.url + "/health").status_code == 200

    r = c.completions.create(model=MODEL, prompt="hi", max_tokens=5)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == _decode(REPLY_IDS[:5]) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 5, 7)

    r = c.completions.create(model=MODEL, prompt=[104, 105], max_tokens=100)  # token ids
    assert r.choices[0].text == REPLY and r.choices[0].finish_reason == "stop"  # EOS
    assert r.usage.completion_tokens == len(REPLY_IDS)  # the EOS token counts, as in vLLM


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 6, 7, 9, 10, 30])
def test_streamed_text_equals_whole_text(server, max_tokens):
    """Cut anywhere, even inside é, € or 🙂: streamed pieces join to the whole answer."""
    c = server.openai()
    whole = c.completions.create(model=MODEL, prompt="x", max_tokens=max_tokens)
    chunks = list(c.completions.create(model=MODEL, prompt="x", max_tokens=max_tokens,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text == _decode(REPLY_IDS[:max_tokens])
    assert all("\ufffd" not in ch.choices[0].text for ch in chunks[:-2] if ch.choices)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
        whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_whole_and_streamed(server):
    c = server.openai()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _decode(REPLY_IDS[:12])
    prompt = TOK.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt.encode())

    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12,
                                            stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage == r.usage

    # no max_tokens: the rest of the context; content parts are joined text
    r = c.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                     "text": "b"}]}])
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    rid = r.id
    assert server.engine.requests[rid].params.max_tokens == MAX_MODEL_LEN - r.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", ["END", ["zzz", "€🙂"], "m E"])
def test_stop_strings_cut_the_text_and_abort(server, stop, stream):
    c = server.openai()
    kw = dict(model=MODEL, prompt="s", max_tokens=200, stop=stop,
              extra_body={"ignore_eos": True})
    if stream:
        chunks = list(c.completions.create(stream=True, **kw))
        text, rid = "".join(ch.choices[0].text for ch in chunks), chunks[0].id
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = c.completions.create(**kw)
        text, rid, finish = r.choices[0].text, r.id, r.choices[0].finish_reason
    first = min(REPLY.find(s) for s in ([stop] if isinstance(stop, str) else stop)
                if s in REPLY)
    assert text == REPLY[:first] and finish == "stop"
    server.engine.wait_for(("abort", rid))  # the engine stops generating


def test_sampling_fields_reach_the_engine(server):
    c = server.openai()
    r = c.completions.create(model=MODEL, prompt="p", max_tokens=50, seed=1234,
                             temperature=0.5, top_p=0.9,
                             extra_body={"top_k": 5, "ignore_eos": True,
                                         "stop_token_ids": [ord("l")]})
    p = server.engine.requests[r.id].params
    assert (p.seed, p.temperature, p.top_p, p.top_k, p.ignore_eos, p.stop_token_ids,
            p.max_tokens) == (1234, 0.5, 0.9, 5, True, (ord("l"),), 50)
    assert r.choices[0].text == REPLY[:REPLY.index("l") + 1]  # the stop token is kept
    assert r.choices[0].finish_reason == "stop"
    assert server.engine.requests[r.id].prompt_ids == tuple(b"p")


def test_vllm_bench_payload(server):
    """What ``vllm bench serve --backend vllm`` sends, an unknown field included."""
    body = {"model": MODEL, "prompt": "bench", "repetition_penalty": 1.0, "max_tokens": 8,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "temperature": 0.0, "best_of": 1, "use_beam_search": False,
            "min_tokens": 0, "presence_penalty": 0, "frequency_penalty": 0.0, "echo": False,
            "some_future_field": {"x": 1}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == \
        _decode(REPLY_IDS[:8])
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 8,
                                   "total_tokens": 13}


# ---------------------------------------------------------------- bad input: 4xx, never 5xx

LONG = [1] * MAX_MODEL_LEN
BAD = [  # (path, body (bytes: raw), status, a word the message names)
    ("completions", b'{"prompt": "a", ', 400, "JSON"),
    ("completions", b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("completions", [1, 2], 400, "dictionary"),
    ("completions", {"max_tokens": 3}, 400, "prompt"),
    ("completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": 1.5}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ("completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"prompt": "a", "top_k": -2}, 400, "top_k"),
    ("completions", {"prompt": "a", "seed": 2**70}, 400, "seed"),
    ("completions", {"prompt": "a", "n": 2}, 400, "n"),
    ("completions", {"prompt": "a", "repetition_penalty": 1.3}, 400, "repetition_penalty"),
    ("completions", {"prompt": "a", "logprobs": 1}, 400, "logprobs"),
    ("completions", {"prompt": "a", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "a", "stop": 5}, 400, "stop"),
    ("completions", {"prompt": "a", "stream": "maybe"}, 400, "stream"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": [0, VOCAB]}, 400, "prompt"),
    ("completions", {"prompt": [-1]}, 400, "prompt"),
    ("completions", {"prompt": "a", "stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
    ("completions", {"prompt": LONG}, 400, "256 tokens"),
    ("completions", {"prompt": LONG[:-4], "max_tokens": 5}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist"),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"content": "x"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "unknown role"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}]},
     400, "messages"),
]


def test_bad_inputs_are_4xx_naming_the_field(server):
    with httpx.Client(base_url=server.url + "/v1", timeout=10) as h:
        for path, body, status, word in BAD:
            kw = {"content": body, "headers": {"content-type": "application/json"}} \
                if isinstance(body, bytes) else {"json": body}
            r = h.post("/" + path, **kw)
            err = r.json()["error"]
            assert (r.status_code, err["code"]) == (status, status), (body, r.text)
            assert word in err["message"], (body, err)
            assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
        TOK.chat_template = None  # a model without a chat template
        try:
            r = h.post("/chat/completions", json={"messages": [{"role": "user",
                                                                "content": "x"}]})
            assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        finally:
            TOK.chat_template = TEMPLATE
        r = h.post("/completions", json={"prompt": "still", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hé"


def _strategy(node: dict, defs: dict) -> st.SearchStrategy:
    """Values that fit a JSON schema node (the subset pydantic writes into OpenAPI)."""
    if "$ref" in node:
        return st.deferred(lambda: _strategy(defs[node["$ref"].split("/")[-1]], defs))
    if "anyOf" in node:
        return st.one_of([_strategy(n, defs) for n in node["anyOf"]])
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        required = set(node.get("required", ()))
        return st.fixed_dictionaries(
            {k: _strategy(v, defs) for k, v in props.items() if k in required},
            optional={k: _strategy(v, defs) for k, v in props.items() if k not in required})
    if kind == "array":
        return st.lists(_strategy(node.get("items", {}), defs), max_size=3)
    if kind == "string":
        return st.text(max_size=12)
    if kind == "integer":
        return st.integers(node.get("minimum"), node.get("maximum"))
    if kind == "number":
        return st.floats(node.get("minimum", node.get("exclusiveMinimum")), node.get("maximum"),
                         exclude_min="exclusiveMinimum" in node, allow_nan=False,
                         allow_infinity=False)
    return {"boolean": st.booleans(), "null": st.none()}.get(kind, JSON)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                    | st.floats(allow_nan=False, allow_infinity=False),  # httpx sends strict JSON
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


# fields accepted at one value only: most generated values are (rightly) a 400
NEUTRAL_ONLY = {"n", "best_of", "repetition_penalty", "presence_penalty", "frequency_penalty",
                "min_p", "min_tokens", "logprobs", "top_logprobs", "echo", "suffix",
                "logit_bias", "use_beam_search", "max_completion_tokens"}


def _bodies(app) -> st.SearchStrategy:
    """(path, body): bodies that fit the app's OpenAPI schema (as they come, and tamed so
    that many run), the same with one field replaced by any JSON value or dropped, and
    any JSON at all."""
    spec = app.openapi()
    defs = spec["components"]["schemas"]
    paths = []
    for path in ("/v1/completions", "/v1/chat/completions"):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        good = _strategy(ref["schema"], defs)

        def mutate(body: dict, data) -> dict:
            key = data.draw(st.sampled_from(sorted(body) or ["prompt"]))
            if data.draw(st.booleans()):
                return {k: v for k, v in body.items() if k != key}
            return {**body, key: data.draw(JSON)}

        def tame(body: dict, data) -> dict:  # likely to run: a real model, room, roles
            out = {k: v for k, v in body.items() if k not in NEUTRAL_ONLY}
            out.update(model=MODEL, max_tokens=data.draw(st.integers(1, 40)))
            if isinstance(body.get("messages"), list):
                out["messages"] = [{**m, "role": "user"} for m in body["messages"]]
            return out

        bad = st.builds(mutate, good, st.data())
        paths.append(st.tuples(st.just(path), st.one_of(good, st.builds(tame, good, st.data()),
                                                        bad, JSON)))
    return st.one_of(paths)


def test_fuzz_from_openapi_schema(server):
    """Generated bodies, schema-conforming and not, never get a 5xx (hypothesis over the
    app's OpenAPI schema; schemathesis would do this, but its pytest plugin, loaded in
    every test session once installed, hides hypothesis' falsifying examples)."""
    seen = []

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=_bodies(server.app))
    def check(request):
        path, body = request
        r = h.post(path, json=body)
        seen.append(r.status_code)
        assert r.status_code < 500, (path, body, r.status_code, r.text)

    with httpx.Client(base_url=server.url, timeout=10) as h:
        check()
    assert 200 in seen and 400 in seen, seen
    assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------- limits, failures, metrics


def _raw_request(url: str, body: dict) -> socket.socket:
    """Send a POST on a socket of our own (so that the test can hang up on it)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_queue_full_429_and_non_streamed_disconnect_aborts():
    with Server(max_pending=1) as srv:
        held = _raw_request(srv.url, {"prompt": "hold on", "max_tokens": 4})
        srv.engine.wait_for("add")
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a"}, timeout=10)
        assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"
        with pytest.raises(openai.RateLimitError):
            srv.openai().completions.create(model=MODEL, prompt="a")
        held.close()  # the client hangs up while its request waits on the engine
        rid = srv.engine.commands[0][1]
        srv.engine.wait_for(("abort", rid))
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert r.status_code == 200  # the slot is free again


def test_streamed_disconnect_aborts(server):
    body = {"prompt": "long", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=10) as r:
        lines = []
        for line in r.iter_lines():
            lines += [line] if line else []
            if len(lines) == 3:
                break  # leaving the block closes the connection mid-stream
    rid = json.loads(lines[0][len("data: "):])["id"]
    server.engine.wait_for(("abort", rid))


def test_dead_engine_503_and_server_stops():
    client_dead = {}
    srv = Server(should_stop=lambda: client_dead.get("stop", False))
    with srv:
        held = _raw_request(srv.url, {"prompt": "hold", "max_tokens": 4})
        srv.engine.wait_for("add")
        body = {"prompt": "long", "max_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=10) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # streaming has begun: a 200
            srv.client.fail_all("rank 1 stopped answering")
            events = [line for line in lines if line]
        # after the headers, an error event, then the end of the stream
        assert events[-1] == "data: [DONE]"
        err = json.loads(events[-2][len("data: "):])["error"]
        assert err["code"] == 503 and "rank 1 stopped" in err["message"]
        reply = b""
        while b"rank 1 stopped" not in reply and (data := held.recv(4096)):
            reply += data
        reply = reply.decode()
        assert reply.startswith("HTTP/1.1 503") and "rank 1 stopped" in reply
        held.close()
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
        client_dead["stop"] = True  # the CLI's should_stop: lambda: client.dead is not None
        srv.thread.join(5)
        assert not srv.thread.is_alive()


def test_api_key():
    with Server(api_key="s3cret") as srv:
        with pytest.raises(openai.AuthenticationError):
            srv.openai("wrong").completions.create(model=MODEL, prompt="a", max_tokens=1)
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        r = srv.openai("s3cret").completions.create(model=MODEL, prompt="a", max_tokens=1)
        assert r.choices[0].text == "H"
        assert httpx.get(srv.url + "/health").status_code == 200  # not under /v1
        assert httpx.get(srv.url + "/metrics").status_code == 200


def test_metrics(server):
    from prometheus_client.parser import text_string_to_metric_families

    server.openai().completions.create(model=MODEL, prompt="m", max_tokens=3)
    server.client.stats = EngineStats(
        running=(2, 1), waiting=(0, 3), kv_blocks_used=(5, 10), kv_blocks_total=20, steps=9,
        tokens_LE=np.array([[4, 0, 2], [1, 1, 5]]), expert_maps=(expert_map(3, 2),) * 2,
        dispatch_bytes=4096)
    text = httpx.get(server.url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("epmoe:num_requests_running", rank="1") == 1
    assert value("epmoe:num_requests_waiting", rank="1") == 3
    assert value("epmoe:kv_cache_usage_perc", rank="1") == 0.5
    assert value("epmoe:moe_expert_tokens_total", layer="1", expert="2") == 5
    assert value("epmoe:moe_balancedness", layer="0") == 0.75  # ranks: experts 0-1, 2
    assert value("epmoe:moe_balancedness", layer="1") == 3.5 / 5
    assert value("epmoe:moe_dispatch_bytes_total") == 4096
    assert value("epmoe:engine_steps_total") == 9
    assert value("epmoe:request_success_total", finished_reason="length") >= 1
    assert value("epmoe:time_to_first_token_seconds_count") >= 1
    assert value("epmoe:e2e_request_latency_seconds_count") >= 1
    assert value("epmoe:generation_tokens_total") >= 3
    assert value("epmoe:prompt_tokens_total") >= 1


def test_a_request_the_engine_refuses_on_arrival_is_a_400(server):
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/completions", timeout=10,
                       json={"model": MODEL, "prompt": "huge", "max_tokens": 4,
                             "stream": stream})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "exceeds the KV cache" in err["message"] and err["param"] == "max_tokens"
