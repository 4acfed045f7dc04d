"""What serving costs: streamed tokens/s through the server at one client against ``decoder.generate`` directly;
and what a server delivers to many concurrent streaming clients (``load_test``).

Both run the same decoder on the same prompts with the same settings, interleaved (generate, then the same prompt
through the server), so that a machine busy with something else slows both alike. The server's figure counts from
sending the request to reading ``data: [DONE]``: HTTP, queueing, prompt encoding, detokenization and the SSE chunks
included. The decoder is never used from two threads at once: the direct calls run while the server is idle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.serve.app import create_app
from medusa_llama.serve.config import ServeConfig
from medusa_llama.serve.engine import DecoderEngine
from medusa_llama.serve.server import background_server


@dataclass
class ServeOverhead:
    tokens: int
    """New tokens per side (the same on both: greedy)."""
    generate_tokens_per_s: float
    server_tokens_per_s: float

    @property
    def ratio(self) -> float:
        """Server tokens/s over generate tokens/s (1.0: serving costs nothing)."""
        return self.server_tokens_per_s / self.generate_tokens_per_s


def _greedy_stream_body(prompt_ids: list[int], max_tokens: int) -> dict:
    """The request both kinds of client send: a greedy streamed completion of ``prompt_ids``."""
    return {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def _usage_chunk(line: str) -> dict | None:
    """The final chunk (the one with ``usage``) if ``line`` is it, else None."""
    return json.loads(line[6:]) if line.startswith("data: {") and '"usage"' in line else None


def _check_final(final: dict | None) -> dict:
    if final is None:
        raise RuntimeError("the stream ended without usage")
    return final


def stream_once(client: httpx.Client, url: str, prompt_ids: list[int], max_tokens: int) -> int:
    """Stream one completion of ``prompt_ids``; the number of new tokens (from the final chunk's usage)."""
    final, body = None, _greedy_stream_body(prompt_ids, max_tokens)
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            final = _usage_chunk(line) or final
    return _check_final(final)["usage"]["completion_tokens"]


def measure_serve_overhead(
    decoder: VanillaDecoder | MedusaDecoder, prompts: list[list[int]], max_tokens: int, repeats: int = 2
) -> ServeOverhead:
    """Tokens/s of ``decoder.generate`` and of one streaming client of a server on the same decoder (loopback).

    Every prompt runs once on both sides before the clock: on a GPU the first prompt of a new prefill bucket captures
    that bucket's CUDA graph, and whichever side met it first would pay the capture."""
    cfg = GenerationConfig(max_new_tokens=max_tokens)
    direct_s = served_s = 0.0
    direct_n = served_n = 0
    with background_server(create_app(DecoderEngine(decoder), ServeConfig())) as url, httpx.Client(timeout=600) as c:
        for ids in prompts:  # warm-up, both sides
            decoder.generate(ids, cfg)
            stream_once(c, url, ids, max_tokens)
        for _ in range(repeats):
            for ids in prompts:
                t0 = time.perf_counter()
                direct_n += len(decoder.generate(ids, cfg).tokens)
                t1 = time.perf_counter()
                served_n += stream_once(c, url, ids, max_tokens)
                served_s += time.perf_counter() - t1
                direct_s += t1 - t0
    if direct_n != served_n:
        raise RuntimeError(f"the server produced {served_n} tokens where generate produced {direct_n}")
    return ServeOverhead(direct_n, direct_n / direct_s, served_n / served_s)


# -- many clients at once ---------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What ``concurrency`` streaming clients got from a server, all requests together."""

    concurrency: int
    requests: int
    tokens: int
    """New tokens, from the final chunks' usage."""
    steps: int
    """Decode steps the requests took (the ``medusa`` field of the final chunks)."""
    seconds: float
    """From the first request sent to the last ``data: [DONE]`` read."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def mean_accepted(self) -> float:
        """Tokens per decode step over all requests (the prefill's token excluded)."""
        return (self.tokens - self.requests) / self.steps if self.steps else 1.0


async def _stream_async(client, url: str, prompt_ids: list[int], max_tokens: int) -> tuple[int, int]:
    """Stream one completion; (new tokens, decode steps) from its final chunk."""
    final = None
    async with client.stream(
        "POST", f"{url}/v1/completions", json=_greedy_stream_body(prompt_ids, max_tokens)
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            final = _usage_chunk(line) or final
    final = _check_final(final)
    return final["usage"]["completion_tokens"], final.get("medusa", {}).get("steps", 0)


def load_test(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> LoadResult:
    """``concurrency`` streaming clients, each sending the next waiting prompt as soon as its last answer ended,
    until every prompt is answered (one event loop on this thread; the server runs on its own threads)."""
    import asyncio

    async def run() -> LoadResult:
        waiting = list(reversed(prompts))
        tokens = steps = 0
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:

            async def worker() -> None:
                nonlocal tokens, steps
                while waiting:
                    n, s = await _stream_async(client, url, waiting.pop(), max_tokens)
                    tokens, steps = tokens + n, steps + s

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return LoadResult(concurrency, len(prompts), tokens, steps, time.perf_counter() - t0)

    return asyncio.run(run())


def measure_server_throughput(engine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> LoadResult:
    """Tokens/s of a server on ``engine`` under ``concurrency`` streaming clients, after a short warm-up (CUDA graph
    capture, first connections). ``stream_interval`` is the server's default, as a user gets it."""
    cfg = ServeConfig(max_waiting=max(64, concurrency * 2))
    with background_server(create_app(engine, cfg)) as url:
        load_test(url, prompts[:concurrency], concurrency, 8)
        return load_test(url, prompts, concurrency, max_tokens)


def write_report(path: str | None, backbone, seconds: float, **fields) -> dict:
    """A benchmark's JSON report: the device and dtype first, then ``fields``, then the run's seconds; written to
    ``path`` if given. Returns it."""
    from medusa_llama.pipeline import device_name

    report = {"device": device_name(backbone.device), "dtype": str(backbone.dtype), **fields, "seconds": seconds}
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return report
