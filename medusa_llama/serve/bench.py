"""What serving costs: streamed tokens/s through the server at one client against ``decoder.generate`` directly.

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


def stream_once(client: httpx.Client, url: str, prompt_ids: list[int], max_tokens: int) -> int:
    """Stream one completion of ``prompt_ids``; the number of new tokens (from the final chunk's usage)."""
    body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    tokens = None
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without usage")
    return tokens


def measure_serve_overhead(
    decoder: VanillaDecoder | MedusaDecoder, prompts: list[list[int]], max_tokens: int, repeats: int = 2
) -> ServeOverhead:
    """Tokens/s of ``decoder.generate`` and of one streaming client of a server on the same decoder (loopback)."""
    cfg = GenerationConfig(max_new_tokens=max_tokens)
    direct_s = served_s = 0.0
    direct_n = served_n = 0
    with background_server(create_app(DecoderEngine(decoder), ServeConfig())) as url, httpx.Client(timeout=600) as c:
        decoder.generate(prompts[0], cfg)  # warm-up, both sides
        stream_once(c, url, prompts[0], max_tokens)
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
