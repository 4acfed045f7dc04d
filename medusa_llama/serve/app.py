"""The HTTP application: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` over a scheduler.

A request is validated, encoded and checked against the context here, on the event loop; then its ``Sequence``
waits in the scheduler's queue. The worker thread hands the sequence's events to a ``Channel`` that the response
reads on the loop: server-sent events in OpenAI's chunk format for ``stream: true`` (at most one chunk per
``stream_interval``), one JSON body otherwise. A client that goes away cancels its sequence (the stream's
``finally``, or a disconnect poll while a whole answer is computed), and the worker ends it at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.errors import MedusaError
from medusa_llama.serve.channel import Channel
from medusa_llama.serve.config import ServeConfig
from medusa_llama.serve.engine import Delta, Engine, Failed, Finished, Sequence
from medusa_llama.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    parse,
    sse,
    usage,
)
from medusa_llama.serve.scheduler import QueueFull, Scheduler
from medusa_llama.serve.text import TextStream

log = logging.getLogger(__name__)


def create_app(engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``. Its scheduler (and worker thread) lives from startup to shutdown."""
    cfg = config or ServeConfig()
    scheduler = Scheduler(engine, cfg.max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        log.info("serving %s (%s decoding)", engine.model_id, engine.kind)
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="medusa-llama", lifespan=lifespan)
    app.state.scheduler = scheduler
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(exc.detail), exc.status_code, kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: still OpenAI's shape, and logged
        log.exception("unexpected error answering %s", request.url.path)
        return JSONResponse(APIError(f"internal error: {exc}", 500, "server_error").body(), status_code=500)

    def model_card() -> dict:
        return {
            "id": engine.model_id,
            "object": "model",
            "created": created,
            "owned_by": "medusa-llama",
            "max_model_len": engine.max_seq_len,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        _check_model(engine, model)
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": scheduler.waiting}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, parse(ChatRequest, await request.body()), engine, scheduler, cfg)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, parse(CompletionRequest, await request.body()), engine, scheduler, cfg)

    return app


def _check_model(engine: Engine, name: str | None) -> None:
    if name is not None and name != engine.model_id:
        raise APIError(
            f"the model {name!r} does not exist: this server serves {engine.model_id!r}",
            status=404,
            param="model",
            code="model_not_found",
        )


def _prompt_ids(req: ChatRequest | CompletionRequest, engine: Engine) -> list[int]:
    if isinstance(req, ChatRequest):
        try:
            ids = engine.tokenizer.encode_chat(req.chat())
        except MedusaError as exc:
            raise APIError(str(exc), param="messages") from None
    elif isinstance(req.prompt, str) or isinstance(req.prompt[0], str):
        ids = engine.tokenizer.encode(req.prompt if isinstance(req.prompt, str) else req.prompt[0])
    else:
        ids = req.prompt
        if not all(0 <= i < engine.vocab_size for i in ids):
            raise APIError(f"prompt: token ids must lie in [0, {engine.vocab_size})", param="prompt")
    if not ids:
        raise APIError("the prompt is empty", param="prompt")
    return ids


def _generation_config(req: ChatRequest | CompletionRequest, n_prompt: int, engine: Engine, cfg: ServeConfig):
    """The request's GenerationConfig; the budget defaults to the server's, cut to the room left in the context."""
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    room = engine.room(n_prompt)
    if room < 1:
        raise APIError(
            f"the prompt has {n_prompt} tokens and leaves no room for new tokens in the model's context of "
            f"{engine.max_seq_len} tokens",
            param=param,
            code="context_length_exceeded",
        )
    budget = req.budget
    if budget is not None and budget > room:
        raise APIError(
            f"max_tokens is {budget} but the prompt ({n_prompt} tokens) leaves room for {room} in the model's context "
            f"of {engine.max_seq_len} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    temperature = cfg.temperature if req.temperature is None else req.temperature
    acceptance = "greedy" if temperature == 0 else ("typical" if cfg.acceptance == "typical" else "sampling")
    return GenerationConfig(
        max_new_tokens=budget or min(cfg.max_tokens, room),
        temperature=temperature,
        acceptance=acceptance,
        seed=req.seed,
    )


async def _complete(request: Request, req, engine: Engine, scheduler: Scheduler, cfg: ServeConfig):
    _check_model(engine, req.model)
    ids = _prompt_ids(req, engine)
    gen = _generation_config(req, len(ids), engine, cfg)
    channel = Channel(asyncio.get_running_loop())

    def sink(event) -> None:  # worker thread
        channel.put(event)
        if channel.closed:  # the event loop is gone: nobody reads this sequence any more
            seq.cancel()

    seq = Sequence(ids, gen, TextStream(engine.tokenizer, req.stops), sink)
    try:
        scheduler.submit(seq)
    except QueueFull as exc:
        raise APIError(f"the server is busy: {exc}", status=429, type="rate_limit_error") from None
    except RuntimeError as exc:
        raise APIError(str(exc), status=503, type="server_error") from None
    reply = Reply(isinstance(req, ChatRequest), engine.model_id)
    if req.stream:
        body = _stream(seq, channel, reply, req.include_usage, engine, cfg.stream_interval)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    return await _whole(request, seq, channel, reply, engine)


def _stats(ev: Finished, engine: Engine) -> tuple[dict, dict]:
    medusa = {"decoder": engine.kind, "mean_accepted_tokens": round(ev.mean_accepted, 4), "steps": ev.steps}
    log.info(
        "answered: %d prompt + %d new tokens, %d steps, %.2f accepted tokens/step, %.2f s (%s)",
        ev.prompt_tokens,
        ev.completion_tokens,
        ev.steps,
        ev.mean_accepted,
        ev.seconds,
        ev.reason,
    )
    return usage(ev.prompt_tokens, ev.completion_tokens), medusa


def _failure(ev: Failed) -> APIError:
    return APIError(ev.message, ev.status, "server_error" if ev.status >= 500 else "invalid_request_error")


def _split(events: list) -> tuple[str, Finished | Failed | None]:
    """A batch of events as (its text, the last event if the batch ends the sequence)."""
    end = events[-1] if events and not isinstance(events[-1], Delta) else None
    text = "".join(ev.text for ev in events if isinstance(ev, Delta))
    return (text + end.text if isinstance(end, Finished) else text), end


async def _whole(request: Request, seq: Sequence, channel: Channel, reply: Reply, engine: Engine):
    parts: list[str] = []
    try:
        while True:
            try:
                text, end = _split(await asyncio.wait_for(channel.get(), timeout=0.5))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    log.info("client went away: cancelling its request")
                    return JSONResponse(APIError("client disconnected", 499).body(), status_code=499)
                continue
            parts.append(text)
            if isinstance(end, Finished):
                return reply.whole("".join(parts), end.reason, *_stats(end, engine))
            if isinstance(end, Failed):
                raise _failure(end)
    finally:
        seq.cancel()  # a no-op once finished; frees the model if the client went away or the handler was cancelled


async def _stream(seq: Sequence, channel: Channel, reply: Reply, include_usage: bool, engine: Engine, interval: float):
    """The SSE body. Chunks go out at most every ``interval`` seconds (the last one at once), each with all the text
    accepted since the one before."""
    loop = asyncio.get_running_loop()
    try:
        if reply.chat:
            yield sse(reply.chunk(first=True))
        sent = -math.inf
        while True:
            wait = sent + interval - loop.time()
            if wait > 0:
                await channel.wait_end(wait)
            text, end = _split(await channel.get())
            out = reply.text_sse(text) if text else ""
            if isinstance(end, Finished):
                use, medusa = _stats(end, engine)
                out += sse({**reply.chunk(finish_reason=end.reason), "usage": use, "medusa": medusa})
                if include_usage:
                    out += sse(reply.usage_chunk(use, medusa))
            elif isinstance(end, Failed):
                out += sse(_failure(end).body())
            if end is not None:
                yield out + sse("[DONE]")
                return
            if out:
                yield out
                sent = loop.time()
    finally:
        seq.cancel()  # a no-op once finished; a client that went away frees the model at the next step
