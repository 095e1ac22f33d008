"""The HTTP front of ``python -m epmoe serve``: OpenAI-compatible routes over an EngineClient.

    app = build_app(client, tokenizer, "my-model", max_model_len=4096, vocab_size=32000)
    asyncio.run(serve_http(app, "0.0.0.0", 8000, should_stop=lambda: client.dead is not None))

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both streamed as server-sent events when
``stream`` is set), ``GET /metrics``. The front owns all text: it tokenises the
prompt (or renders the chat template), checks it against the context length,
hands token ids to the engine, detokenises what comes back and finds stop
strings (:mod:`.detokenize`). Leaving a request early (a stop string, a
client that hung up) closes the engine stream, which aborts the request there.

Errors have OpenAI's body (:func:`.protocol.error_body`): 400 for any bad
input (vLLM's status, not FastAPI's 422), 401 for a wrong API key, 404 for
another model's name, 429 when the engine's queue is full, 503 once the
engine is dead. A request waiting for the engine checks every ``POLL_S``
seconds whether its client is still there, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .client import EngineClient
from .detokenize import TextStream
from .metrics import ServeMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseBuilder,
    error_body,
    usage,
    validation_message,
)
from .types import EngineDead, QueueFull, SamplingParams
from .types import Request as EngineRequest

__all__ = ["build_app", "serve_http"]

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a request waiting on the engine checks that its client is there


class _HTTPError(Exception):
    def __init__(self, code: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class _ClientGone(Exception):
    """The HTTP client disconnected while its request was waiting on the engine."""


def _error(code: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, code, param), status_code=code)


@dataclass(frozen=True)
class _Event:
    """One step of a response: text to send, and on the last step why it finished."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # so far

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens)


async def _until_disconnected(items: AsyncIterator, request: Request) -> AsyncIterator:
    """``items`` as they come; raises :class:`_ClientGone` once ``request``'s client has
    gone, checked every ``POLL_S`` s while waiting. Cancelling the pending ``__anext__``
    throws into the engine stream, whose ``finally`` aborts the request."""
    while True:
        nxt = asyncio.ensure_future(anext(items))  # a task per item: a few µs per token
        try:
            while not (await asyncio.wait({nxt}, timeout=POLL_S))[0]:
                if await request.is_disconnected():
                    raise _ClientGone()
        finally:
            if not nxt.done():
                nxt.cancel()
                await asyncio.wait({nxt})
        try:
            item = nxt.result()
        except StopAsyncIteration:
            return
        yield item


class _SSE(StreamingResponse):
    """A StreamingResponse that closes its iterator when sending fails (ASGI spec 2.4
    servers raise in ``send`` and leave the generator to the garbage collector)."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False,
                                                               separators=(",", ":"))
    return f"data: {data}\n\n"


class _Front:
    """What the routes share: the engine client, the tokenizer, the limits, the metrics."""

    def __init__(self, client: EngineClient, tokenizer: Any, model_name: str,
                 max_model_len: int, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.client, self.tokenizer, self.model_name = client, tokenizer, model_name
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.metrics = ServeMetrics(client)

    # ------------------------------------------------------------------ request -> ids

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise _HTTPError(404, f"The model `{name}` does not exist.", "model")

    def _check_ids(self, ids: Iterable[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise _HTTPError(400, f"{param}: token id {bad[0]} is outside the vocabulary "
                                  f"[0, {self.vocab_size})", param)

    def prompt_ids(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            return list(self.tokenizer.encode(body.prompt))
        self._check_ids(body.prompt, "prompt")
        return list(body.prompt)

    def chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise _HTTPError(400, "this model's tokenizer has no chat template, so "
                                  "/v1/chat/completions cannot render messages; use "
                                  "/v1/completions with a prompt", "messages")
        try:  # a template may raise on anything (roles out of order, a missing field)
            text = self.tokenizer.apply_chat_template(
                body.template_messages(), **(body.chat_template_kwargs or {}), tokenize=False,
                add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # bad input is a 400, whatever the template raised
            raise _HTTPError(400, f"messages: the chat template could not render them: "
                                  f"{type(e).__name__}: {e}", "messages") from e
        if not isinstance(text, str):
            raise _HTTPError(400, "chat_template_kwargs: the template did not return text",
                             "chat_template_kwargs")
        # the template writes BOS itself where the model wants one
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def engine_request(self, prefix: str, ids: list[int], body: Any, max_tokens: int | None,
                       what: str) -> EngineRequest:
        """The engine's request, after the context-length and sampling checks (400 each)."""
        n, limit = len(ids), self.max_model_len
        if n == 0:
            raise _HTTPError(400, f"{what}: the prompt has no tokens", what)
        if n >= limit:
            raise _HTTPError(400, f"This model's maximum context length is {limit} tokens, and "
                                  f"the {what} has {n} tokens: no room for a completion.", what)
        if max_tokens is None:
            max_tokens = limit - n
        if n + max_tokens > limit:
            raise _HTTPError(400, f"This model's maximum context length is {limit} tokens. "
                                  f"However, you requested {n + max_tokens} tokens ({n} in the "
                                  f"{what}, {max_tokens} in the completion). Please reduce the "
                                  f"length of the {what} or max_tokens.", "max_tokens")
        stop_ids = tuple(body.stop_token_ids or ())
        self._check_ids(stop_ids, "stop_token_ids")
        top_k = body.top_k if body.top_k is not None else 0
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if top_k >= self.vocab_size else top_k,  # k past the vocab: all
                seed=body.seed, ignore_eos=body.ignore_eos, stop_token_ids=stop_ids)
        except ValueError as e:
            raise _HTTPError(400, str(e), str(e).split()[0]) from e
        return EngineRequest(f"{prefix}-{uuid.uuid4().hex}", tuple(ids), params)

    # ------------------------------------------------------------------ ids -> text

    async def events(self, req: EngineRequest, stream: TextStream, http_request: Request,
                     t0: float) -> AsyncIterator[_Event]:
        """The response step by step; ends with an event that has a finish_reason.
        Raises QueueFull / EngineDead (before any event or, EngineDead, later), _ClientGone,
        or _HTTPError: 400 when the engine refuses the request on arrival (more than its KV
        cache can ever hold), 500 when it fails later."""
        n_prompt, n_out, first = len(req.prompt_ids), 0, True
        reason: str | None = "abort"  # what the metrics count if we leave early
        admitted = False  # the engine has answered at least once
        try:
            async with aclosing(self.client.generate(req)) as outs:
                async for out in _until_disconnected(outs, http_request):
                    admitted = True
                    if out.new_token_ids and first:
                        self.metrics.ttft.observe(time.monotonic() - t0)
                        first = False
                    n_out += len(out.new_token_ids)
                    if out.finish_reason == "error":
                        if n_out == 0 and first:  # refused on arrival (it can never fit the
                            reason = None  # rank's KV cache): the request's fault, a 400
                            raise _HTTPError(400, f"the engine cannot run this request: "
                                                  f"{out.error}", "max_tokens")
                        reason = "error"
                        raise _HTTPError(500, f"the engine failed: {out.error}")
                    text, stopped = stream.push(out.new_token_ids, out.finished)
                    finish = "stop" if stopped else out.finish_reason
                    yield _Event(text, finish, n_prompt, n_out)
                    if finish is not None:  # a stop string: leaving aborts the engine request
                        reason = finish
                        return
        except QueueFull:
            reason = None  # never admitted: counted as rejected by the route
            raise
        except EngineDead:
            reason = "error" if admitted else None  # else counted as rejected (503)
            raise
        finally:
            if reason is not None:
                self.metrics.finished(reason, n_prompt, n_out, time.monotonic() - t0)

    async def respond(self, req: EngineRequest, body: Any, http_request: Request, t0: float,
                      chat: bool) -> Response:
        """The JSON response, or the SSE stream once the first step is there (so that a
        full queue or a dead engine is still a 429 or 503, not an error inside a 200)."""
        skip = () if body.ignore_eos else self.eos_token_ids
        stream = TextStream(self.tokenizer, body.stop_strings(), skip_ids=skip)
        events = self.events(req, stream, http_request, t0)
        fmt = ResponseBuilder(req.request_id, self.model_name, chat)
        if not body.stream:
            async with aclosing(events):  # the last event is the finishing one (or it raises)
                last = [ev async for ev in events][-1]
            return JSONResponse(fmt.full(stream.text, last.finish_reason, last.usage()))
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return _SSE(self._sse(events, first, fmt, body.include_usage),
                    media_type="text/event-stream")

    async def _sse(self, events: AsyncIterator[_Event], ev: _Event, fmt: ResponseBuilder,
                   include_usage: bool) -> AsyncIterator[str]:
        async with aclosing(events):
            try:
                if fmt.chat:  # the first delta carries the role
                    yield _sse(fmt.chunk({"role": "assistant", "content": ""}, None,
                                         include_usage))
                while True:
                    if ev.text or ev.finish_reason:
                        yield _sse(fmt.chunk(ev.text, ev.finish_reason, include_usage))
                    if ev.finish_reason:
                        break
                    ev = await anext(events)
                if include_usage:
                    yield _sse(fmt.usage_chunk(ev.usage()))
            except _ClientGone:
                return
            except (EngineDead, _HTTPError) as e:  # headers are sent: the error is an event
                code = e.code if isinstance(e, _HTTPError) else 503
                yield _sse(error_body(str(e), code))
            yield _sse("[DONE]")


class _ApiKey:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer <key>`` (401 otherwise).
    Plain ASGI, not BaseHTTPMiddleware, which would hide client disconnects."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.key):
                resp = _error(401, "Unauthorized: a missing or wrong API key "
                                   "(Authorization: Bearer <key>)")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(client: EngineClient, tokenizer: Any, model_name: str, max_model_len: int,
              vocab_size: int, api_key: str | None = None,
              eos_token_ids: Iterable[int] = ()) -> FastAPI:
    """The server's ASGI app over ``client`` (whose engine runs elsewhere).

    ``tokenizer``: a Hugging Face tokenizer (``encode``, ``decode``,
    ``apply_chat_template``); ``max_model_len``: prompt plus completion tokens at
    most; ``vocab_size``: the model's, token ids must be below it;
    ``eos_token_ids``: never shown as text (unless ``ignore_eos``), for models
    whose EOS is not a special token of the tokenizer.
    """
    front = _Front(client, tokenizer, model_name, max_model_len, vocab_size, eos_token_ids)
    app = FastAPI(title="epmoe serve", summary="OpenAI-compatible API of an epmoe engine")
    app.state.front = front
    if api_key is not None:
        app.add_middleware(_ApiKey, api_key=api_key)

    def rejected(code: int, message: str, param: str | None = None) -> JSONResponse:
        front.metrics.request_rejected.labels(code=str(code)).inc()
        return _error(code, message, param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return rejected(400, f"the body is not valid JSON: {errors[0].get('msg')}")
        return rejected(400, *validation_message(list(errors)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return rejected(exc.status_code, str(exc.detail))

    @app.exception_handler(_HTTPError)
    async def _ours(request: Request, exc: _HTTPError) -> JSONResponse:
        return rejected(exc.code, exc.message, exc.param)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return rejected(429, f"the server is at its limit of requests in flight: {exc}")

    @app.exception_handler(EngineDead)
    async def _dead(request: Request, exc: EngineDead) -> JSONResponse:
        return rejected(503, f"the engine has stopped: {exc}")

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.get("/health")
    async def health() -> Response:
        if client.dead is not None:
            return _error(503, f"the engine has stopped: {client.dead}")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": int(time.time()),
                "owned_by": "epmoe", "root": model_name, "parent": None,
                "max_model_len": max_model_len, "permission": []}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        t0 = time.monotonic()
        front.check_model(body.model)
        req = front.engine_request("cmpl", front.prompt_ids(body), body, body.max_tokens,
                                   "prompt")
        return await front.respond(req, body, request, t0, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        t0 = time.monotonic()
        front.check_model(body.model)
        req = front.engine_request("chatcmpl", front.chat_ids(body), body,
                                   body.requested_max_tokens, "messages")
        return await front.respond(req, body, request, t0, chat=True)

    @app.get("/metrics")
    async def metrics() -> Response:
        data, content_type = front.metrics.render()
        return Response(data, media_type=content_type)

    return app


async def serve_http(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                     should_stop: threading.Event | Callable[[], bool] | None = None, *,
                     sock: socket.socket | None = None, log_level: str = "warning",
                     graceful_s: float = 5.0) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM (main thread only) or ``should_stop``.

    ``should_stop`` (an Event, or a callable polled every 0.2 s) lets the caller end the
    server, e.g. ``lambda: client.dead is not None`` once the engine has died.
    ``sock``: an already bound socket instead of ``host``/``port`` (tests bind port 0).
    Open connections get ``graceful_s`` seconds to finish after a stop.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_s)
    server = uvicorn.Server(config)
    stop = should_stop.is_set if isinstance(should_stop, threading.Event) else should_stop

    async def watch() -> None:
        while not server.should_exit:
            if stop is not None and stop():
                server.should_exit = True
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        watcher.cancel()
