"""Batched prefill side by side: ``BatchedDecoder.add`` one prompt at a time (one forward each) against one
``add_many`` (one right-padded forward per group of ``--prefill-tokens``), same model, same prompts, one run.
Prints the seconds of each, the ratio, and whether both chose the same first tokens.

    python benchmarks/batch_prefill.py --prompts 64 --min-len 20 --max-len 200      # CPU, embedded model, fp32
"""

from __future__ import annotations

import argparse
import time

import torch

from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.pipeline import load_pipeline_backbone


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--prefill-tokens", type=int, default=None, help="default: the decoder's for the device")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    backbone = load_pipeline_backbone(args.model, args.device, "auto", args.max_len + 16, "fast")
    g = torch.Generator().manual_seed(0)  # ShareGPT-like lengths; random ids (prefill cost does not read them)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, backbone.vocab_size, (n,), generator=g).tolist() for n in lengths]
    cfg = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    dec = BatchedDecoder(backbone, args.prompts, prefill_tokens=args.prefill_tokens)

    def release_all() -> None:
        for row in set(range(dec.capacity)) - set(dec.free_rows()):
            dec.release(row)

    firsts: dict[str, list[int]] = {}

    def one_by_one() -> None:
        rows = [dec.add(q, cfg) for q in prompts]
        firsts["add"] = [dec.result(r).tokens[0] for r in rows]

    def together() -> None:
        rows = dec.add_many(prompts, cfg)
        firsts["add_many"] = [dec.result(r).tokens[0] for r in rows]

    dec.add_many(prompts[:2], cfg)  # warm-up
    release_all()
    best = {"add": float("inf"), "add_many": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("add", one_by_one), ("add_many", together)):
            best[name] = min(best[name], timed(fn))
            release_all()
    print(
        f"{args.prompts} prompts ({min(lengths)}-{max(lengths)} tokens, {sum(lengths)} in all), {backbone.name}, "
        f"{backbone.device} {backbone.dtype}, {torch.get_num_threads()} threads, prefill_tokens {dec.prefill_tokens}, "
        f"best of {args.repeats}"
    )
    print(f"one by one (add): {best['add']:.2f} s; add_many: {best['add_many']:.2f} s")
    same = firsts["add"] == firsts["add_many"]
    print(f"add / add_many: {best['add'] / best['add_many']:.2f}x; same first tokens: {same}")


if __name__ == "__main__":
    main()
