"""The OpenAI-compatible request, response and error bodies of ``python -m epmoe serve``.

Field names and defaults follow OpenAI and vLLM, so that the ``openai`` client
and ``vllm bench serve --backend vllm`` work unchanged. Unknown fields are
ignored, as vLLM does. Fields that vLLM accepts but epmoe does not implement
(penalties, logprobs, beam search, ...) are accepted at their neutral value
and refused otherwise, with a message naming the field: a silently ignored
``repetition_penalty=1.3`` would give a user other text than they asked for.

Every validation failure becomes a 400 (vLLM answers 400, not FastAPI's 422)
with OpenAI's error body, see :func:`error_body`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ResponseBuilder", "StreamOptions",
           "error_body", "usage", "validation_message"]

# torch.Generator.manual_seed takes a 64-bit integer; vLLM bounds seed the same way.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# HTTP status -> OpenAI's error type name (what the openai client raises).
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_body(message: str, code: int, param: str | None = None) -> dict:
    """OpenAI's (and vLLM's) error JSON: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(code, "APIError"),
                      "param": param, "code": code}}


def validation_message(err: ValidationError | list[dict]) -> tuple[str, str | None]:
    """(message naming every failing field, the first field) of a pydantic error list.
    ``body`` (FastAPI's prefix) and pydantic's union-branch names are left out of the path."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    parts, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # a union's branches appear as path items like "list[int]" or "str": not field names
        path = ".".join(x for x in loc if "[" not in x and x not in ("str", "int", "float"))
        first = first or path or None
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{path}: {msg}" if path else msg)
    return "; ".join(dict.fromkeys(parts)) or "invalid request", first


def _only(value: Any, allowed: tuple, what: str) -> Any:
    if value not in allowed:
        raise ValueError(f"unsupported: epmoe serves {what} only, got {value!r}")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # a last chunk with usage and no choices
    continuous_usage_stats: bool = False  # accepted (vLLM); not sent


class _SamplingRequest(BaseModel):
    """Fields common to both endpoints: sampling, stopping, streaming, vLLM extras."""

    # extra: ignore unknown fields (vLLM does); inf/nan: Python's json accepts "NaN".
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None  # None: the served model
    temperature: Annotated[float, Field(ge=0)] | None = None  # None: 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None  # None: 1.0
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM extra; -1 or 0: off
    seed: Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX)] | None = None
    stop: str | list[str] | None = None  # text stop strings, cut from the output
    stop_token_ids: list[int] | None = None  # vLLM extra; the token is kept
    ignore_eos: bool = False  # vLLM extra
    n: int = 1  # choices per request: 1 only
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI: accepted, unused
    # vLLM / OpenAI fields accepted at their neutral value only
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int = 0
    best_of: int | None = None
    use_beam_search: bool = False
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        return _only(v, (1,), "n=1 (send one request per choice)")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        return _only(v, (None, 1), "best_of=1")

    @field_validator("repetition_penalty")
    @classmethod
    def _rep(cls, v: float | None) -> float | None:
        return _only(v, (None, 1.0), "repetition_penalty=1.0")

    @field_validator("presence_penalty", "frequency_penalty", "min_p")
    @classmethod
    def _zero(cls, v: float | None) -> float | None:
        return _only(v, (None, 0.0), "0")

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v: int) -> int:
        return _only(v, (0,), "min_tokens=0")

    @field_validator("use_beam_search")
    @classmethod
    def _beam(cls, v: bool) -> bool:
        return _only(v, (False,), "sampling (use_beam_search=false)")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("unsupported: logit_bias")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings, empty ones dropped (an empty string would stop at once)."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in dict.fromkeys(stops) if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: one prompt, text or token ids."""

    # str, or token ids; a list of one of either is one prompt (a batch of N > 1 is refused)
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # None: the rest of the context
    logprobs: int | None = None  # accepted as null only
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"a batch of {len(v)} prompts is not supported: "
                                 "send one request per prompt")
            v = v[0]
        if len(v) == 0:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        return _only(v, (None,), "logprobs=null")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        return _only(v, (False,), "echo=false")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        return _only(v, (None,), "suffix=null")


class ChatMessage(BaseModel):
    """One chat turn; other keys (``name``, ``tool_calls``...) go to the template as given."""

    model_config = ConfigDict(extra="allow")

    role: str
    # a string, or OpenAI's content parts; text parts only (a text-only model)
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: Any) -> str | None:
        if not isinstance(v, list):
            return v
        texts = []
        for i, part in enumerate(v):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: only text parts ({{'type': 'text', 'text': ...}}) "
                                 f"are supported, got type {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)  # what vLLM does for text-only models


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: messages rendered by the tokenizer's chat template."""

    messages: list[ChatMessage]
    # max_completion_tokens (OpenAI's newer name) wins; neither: the rest of the context
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None  # accepted as false/null only
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM extra
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extra: to the template

    @field_validator("messages")
    @classmethod
    def _some(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("at least one message is needed")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: bool | None) -> bool | None:
        return _only(v, (None, False), "logprobs=false")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None) -> int | None:
        return _only(v, (None, 0), "top_logprobs=0")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for ``tokenizer.apply_chat_template``."""
        # content stays even when None (an assistant turn with tool calls): templates test it
        return [{**m.model_dump(exclude_none=True), "content": m.content} for m in self.messages]


# ---------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseBuilder:
    """The JSON of one response, completions (``text_completion``) or chat
    (``chat.completion``, chunks ``chat.completion.chunk``), whole or as stream chunks.
    One choice (index 0); ``logprobs`` always null."""

    def __init__(self, request_id: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def full(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return {**out, "usage": usage}

    def chunk(self, delta: str | dict, finish_reason: str | None, include_usage: bool) -> dict:
        """``delta``: new text, or (chat) the whole delta, e.g. the first one's role."""
        if self.chat:
            d = delta if isinstance(delta, dict) else {"content": delta} if delta else {}
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
            out = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": delta, "logprobs": None,
                      "finish_reason": finish_reason}
            out = self._envelope("text_completion", [choice])
        # OpenAI: with include_usage every chunk has "usage", null but on the last
        return {**out, "usage": None} if include_usage else out

    def usage_chunk(self, usage: dict) -> dict:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": usage}
