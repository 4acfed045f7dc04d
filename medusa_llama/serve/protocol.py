"""The OpenAI wire format: request models that validate strictly, error bodies, and the response and chunk shapes.

Requests are checked by pydantic in strict mode (``"5"`` is not an integer), and unknown fields are accepted and
ignored, as OpenAI clients send many (``top_p``, ``user``, ...). Responses are plain dicts: they are built once per
chunk on the streaming path, where a dict and ``json.dumps`` are the cheapest.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PositiveInt = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]  # what torch.manual_seed takes


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    """The served model's id; None: the served model (OpenAI requires it; curl users need not)."""
    max_tokens: PositiveInt | None = None
    """Token budget; None: the server's default, cut to what fits in the context."""
    temperature: Temperature | None = None
    """0: greedy; None: the server's default."""
    seed: Seed | None = None
    stop: str | list[str] | None = None
    """Stop strings: the text ends before the first one, which is not returned."""
    stream: bool = False
    stream_options: dict | None = None
    """``{"include_usage": true}`` adds OpenAI's final usage chunk (with empty ``choices``)."""
    n: Literal[1] = 1
    """One choice per request."""

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def budget(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    """OpenAI's newer name for ``max_tokens``; takes precedence."""

    @property
    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)]
    """Text, token ids, or a list of one text (several prompts per request are not served)."""
    echo: Literal[False] = False
    logprobs: None = None


_UNION_TAGS = {"str", "int", "float", "bool", "none"}


def parse(model: type[_Request], raw: bytes) -> _Request:
    """Validate a JSON body; any problem becomes a 400 ``APIError`` naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "json_invalid":
            raise APIError(f"the body is not valid JSON: {err['msg']}") from None
        param = ".".join(p for p in loc if p not in _UNION_TAGS and "[" not in p) or None  # no union member tags
        raise APIError(f"{param or 'body'}: {err['msg']}", param=param, code="invalid_value") from None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Reply:
    """The shapes of one answer, chat (``chat.completion``) or text (``text_completion``), whole or as chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = _new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        # the text chunk's event around a placeholder, so that each chunk JSON-encodes its text alone
        marker = "\x00text\x00"
        head, _, tail = sse(self.chunk(marker)).rpartition(json.dumps(marker))  # the text follows the model's name
        self._text_sse = head, tail

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish_reason: str, usage: dict, medusa: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope([choice], chunk=False), "usage": usage, "medusa": medusa}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope([choice], chunk=True)

    def text_sse(self, text: str) -> str:
        """``sse(self.chunk(text))`` for a non-empty ``text``: the streaming path's event, once per decode step at
        most, built from a template."""
        head, tail = self._text_sse
        return head + json.dumps(text, ensure_ascii=False) + tail

    def usage_chunk(self, usage: dict, medusa: dict) -> dict:
        """OpenAI's last chunk under ``stream_options.include_usage``: no choices, the usage."""
        return {**self._envelope([], chunk=True), "usage": usage, "medusa": medusa}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
