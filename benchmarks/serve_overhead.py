"""What the server costs on the CPU alone (issue 10): a synthetic decoder that emits ``--tokens-per-step`` tokens
every ``--step-ms`` milliseconds, measured directly (``generate``) and through the real server with one streaming
client (the official ``openai`` client, ``stream: true``), interleaved; the ratio is the server's share of the
decoder's speed (target >= 0.90 at H200 speeds: a step every ~1.5 ms delivering ~2.6 tokens).

The synthetic decoder stands in for ``MedusaDecoder`` behind the real ``DecoderEngine``, app, scheduler, channel
and detokenizer (the embedded SmolLM2 tokenizer by default, as a real model would use). Its step passes its time
as a host-bound decoder does (``--wait ops``, the default: spinning, the GIL held, in slices of ``--op-us``
microseconds with the GIL released between them, as PyTorch releases it around every op it dispatches), or
spinning with the GIL held throughout (``spin``), or sleeping (``sleep``: the GIL free, a thread blocked on the GPU).
Any work another thread of the server does meanwhile delays the decoder, as it does on a GPU machine.

``--compare REF`` also runs the serving code of git revision REF (``git archive`` into a temporary folder, imported
first through PYTHONPATH) in alternating subprocesses, so before and after are measured side by side in one run:

    python benchmarks/serve_overhead.py --step-ms 1.5 --tokens-per-step 3 --max-tokens 256 --compare HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from medusa_llama.decode.decoder import GenerationConfig, GenerationResult

TEXT = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts several tokens with cheap heads and "
    "verifies them in one forward pass of the base model, so that each step emits more than one token. Naïve "
    "servers pay for every token on the host: déjà vu, 你好, emoji 🦊 and all. "
)


class SyntheticDecoder:
    """A decoder with ``generate``'s interface that costs ``step_s`` per step and emits ``per_step`` tokens per step
    (the first one alone, as a prefill does), cycling through the tokens of ``TEXT``; never EOS."""

    def __init__(
        self,
        tokenizer,
        step_s: float,
        per_step: int,
        wait: str = "ops",
        op_s: float = 65e-6,
        max_seq_len: int = 1 << 16,
    ):
        ids = list(tokenizer(TEXT)["input_ids"])
        self.tokens = ids
        self.step_s, self.per_step, self.wait, self.op_s = step_s, per_step, wait, op_s
        self.backbone = SimpleNamespace(
            tokenizer=tokenizer,
            name="synthetic",
            vocab_size=max(ids) + 1,
            max_seq_len=max_seq_len,
            eos_token_ids=(),
        )

    def _work(self) -> None:
        if self.wait == "sleep":
            time.sleep(self.step_s)
            return
        now = time.perf_counter()
        end = now + self.step_s
        while now < end:
            op_end = min(end, now + self.op_s) if self.wait == "ops" else end
            while now < op_end:
                now = time.perf_counter()
            if self.wait == "ops":
                time.sleep(0)  # releases the GIL for a moment, as a PyTorch op's dispatch does

    def generate(self, prompt_ids, config: GenerationConfig, on_tokens=None) -> GenerationResult:
        t0 = time.perf_counter()
        budget, out, calls, i = config.max_new_tokens, [], 0, len(prompt_ids)
        n = 1  # the prefill's token
        while len(out) < budget:
            self._work()
            new = [self.tokens[(i + k) % len(self.tokens)] for k in range(min(n, budget - len(out)))]
            i += len(new)
            out += new
            if on_tokens:
                on_tokens(new)
            calls, n = calls + 1, self.per_step
        return GenerationResult(tokens=out, steps=calls - 1, total_s=time.perf_counter() - t0)


@dataclass
class Overhead:
    tokens: int
    direct_tokens_per_s: float
    server_tokens_per_s: float
    chunks: float
    """Streamed chunks per request (role, text and final chunks included)."""

    @property
    def ratio(self) -> float:
        return self.server_tokens_per_s / self.direct_tokens_per_s


def measure(decoder: SyntheticDecoder, requests: int, max_tokens: int, stream_interval: float) -> Overhead:
    """Interleaved: ``generate`` on a prompt, then the same prompt streamed through the server by one openai client."""
    import openai

    from medusa_llama.serve.app import create_app
    from medusa_llama.serve.config import ServeConfig
    from medusa_llama.serve.engine import DecoderEngine
    from medusa_llama.serve.server import background_server

    cfg = GenerationConfig(max_new_tokens=max_tokens)
    tok = decoder.backbone.tokenizer
    app = create_app(DecoderEngine(decoder, "synthetic"), ServeConfig(stream_interval=stream_interval))
    direct_s = served_s = 0.0
    direct_n = served_n = chunks = 0
    with background_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def stream(ids: list[int]) -> tuple[int, str, int]:
            final, parts, n = None, [], 0
            for chunk in client.completions.create(
                model="synthetic",
                prompt=ids,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            ):
                n += 1
                parts += [c.text for c in chunk.choices]
                final = chunk.usage or final
            return final.completion_tokens, "".join(parts), n

        stream([1, 2, 3])  # warm-up: connection, first request
        for r in range(requests + 1):
            ids = decoder.tokens[r : r + 5]
            t0 = time.perf_counter()
            res = decoder.generate(ids, cfg)
            t1 = time.perf_counter()
            n, text, k = stream(ids)
            t2 = time.perf_counter()
            if n != len(res.tokens) or text != tok.decode(res.tokens, skip_special_tokens=True):
                raise RuntimeError(f"request {r}: the server's {n} tokens differ from generate's {len(res.tokens)}")
            if r:  # the first pair is a warm-up
                direct_s, served_s = direct_s + t1 - t0, served_s + t2 - t1
                direct_n, served_n, chunks = direct_n + len(res.tokens), served_n + n, chunks + k
    return Overhead(direct_n, direct_n / direct_s, served_n / served_s, chunks / requests)


def _worker(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    import medusa_llama.serve as serve
    from medusa_llama.loading import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    decoder = SyntheticDecoder(tok, args.step_ms / 1e3, args.tokens_per_step, args.wait, args.op_us / 1e6)
    m = measure(decoder, args.requests, args.max_tokens, args.stream_interval)
    row = {"code": str(Path(serve.__file__).parent), "tokens": m.tokens, "chunks": m.chunks}
    row.update(direct=m.direct_tokens_per_s, server=m.server_tokens_per_s, ratio=m.ratio)
    print(json.dumps(row), flush=True)


def _archive(ref: str, root: Path, into: str) -> str:
    """The ``medusa_llama`` package of git revision ``ref``, extracted under ``into``."""
    tar = subprocess.run(["git", "-C", str(root), "archive", ref, "medusa_llama"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", into], input=tar.stdout, check=True)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, default=1.5, help="milliseconds per synthetic decode step")
    ap.add_argument("--tokens-per-step", type=int, default=3, help="tokens each step emits")
    ap.add_argument("--wait", choices=["ops", "spin", "sleep"], default="ops", help="how a step passes its time")
    ap.add_argument("--op-us", type=float, default=65.0, help="--wait ops: microseconds between GIL releases")
    ap.add_argument("--max-tokens", type=int, default=256, help="new tokens per request")
    ap.add_argument("--requests", type=int, default=6, help="measured requests per run (after one warm-up pair)")
    ap.add_argument("--stream-interval", type=float, default=0.02, help="the server's --stream-interval (seconds)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer to detokenize with (default: the embedded model's)")
    ap.add_argument("--compare", default=None, help="git revision whose serving code to measure beside this one")
    ap.add_argument("--runs", type=int, default=3, help="runs per code version (alternating); medians are shown")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    root = Path(__file__).resolve().parents[1]
    flags = [a for a in sys.argv[1:] if a != "--worker"]
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"working tree": str(root)}
        if args.compare:
            versions = {args.compare: _archive(args.compare, root, tmp), **versions}
        runs: dict[str, list[dict]] = {name: [] for name in versions}
        for _ in range(args.runs):
            for name, path in versions.items():
                env = {**os.environ, "PYTHONPATH": path}
                cmd = [sys.executable, __file__, *flags, "--worker"]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"synthetic decoder: {args.tokens_per_step} tokens per {args.step_ms} ms step ({args.wait}), "
        f"{args.max_tokens} tokens x {args.requests} requests, stream_interval {args.stream_interval} s, "
        f"median of {args.runs} runs"
    )
    print(f"{'code':>14s} {'direct tok/s':>13s} {'server tok/s':>13s} {'ratio':>7s} {'chunks/req':>11s}  ratios")
    for name, rows in runs.items():

        def med(key: str, rows=rows) -> float:
            return statistics.median(r[key] for r in rows)

        each = " ".join(f"{r['ratio']:.3f}" for r in rows)
        print(
            f"{name:>14s} {med('direct'):13.0f} {med('server'):13.0f} {med('ratio'):7.3f} {med('chunks'):11.1f}  {each}"
        )


if __name__ == "__main__":
    main()
