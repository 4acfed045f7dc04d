"""Draft vocabulary (FR-Spec) off vs on, side by side in one run: the embedded model, one heads directory, the
held-out prompts; every prompt decoded by every variant in turn, so a shared, noisy machine slows them alike.

    python benchmarks/draft_vocab_speed.py --heads DIR --sizes 0 4096 8192 16384 [--device cpu] [--limit 10]

DIR must hold a draft_vocab.safetensors at least as long as the largest size (sizes use its first N tokens; 0 is
the full vocabulary). Reports per variant: tokens/s (all tokens / all time), tokens/step, output identical to
vanilla greedy on every prompt, and the proposal phase's median ms per step (``MedusaDecoder.profile``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder
from medusa_llama.eval.prompts import chat_ids, load_prompts
from medusa_llama.pipeline import DecoderOptions, load_pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 4096, 8192, 16384])
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # a shared machine: fewer threads than cores avoids oversubscription

    pipe = load_pipeline(DecoderOptions(heads=args.heads, device=args.device, draft_vocab=0))
    bb, cfg = pipe.backbone, GenerationConfig(max_new_tokens=args.max_new_tokens)
    decoders = {"vanilla": pipe.vanilla()}
    decoders |= {
        f"draft {n}" if n else "off": MedusaDecoder(bb, pipe.heads, pipe.tree, draft_vocab=n) for n in args.sizes
    }
    prompts = [chat_ids(bb.tokenizer, q.text) for q in load_prompts(None, limit=args.limit)]
    for dec in decoders.values():  # warm-up
        dec.generate(prompts[0], GenerationConfig(max_new_tokens=8))
    stats = {name: {"tokens": 0, "steps": 0, "seconds": 0.0, "identical": 0} for name in decoders}
    for ids in prompts:
        reference = None
        for name, dec in decoders.items():
            t0 = time.perf_counter()
            res = dec.generate(ids, cfg)
            s = stats[name]
            s["seconds"] += time.perf_counter() - t0
            s["tokens"] += len(res.tokens)
            s["steps"] += res.steps
            reference = reference or res.tokens
            s["identical"] += res.tokens == reference
    for name, dec in decoders.items():
        s = stats[name]
        s["tokens_per_s"] = s["tokens"] / s["seconds"]
        s["tokens_per_step"] = (s["tokens"] - len(prompts)) / max(s["steps"], 1)
        s["proposal_ms"] = dec.profile(prompts[0], cfg, steps=16)["proposal"] if name != "vanilla" else 0.0
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, tree {pipe.tree.size}, {bb.device}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("variant       tok/s  tok/step  proposal ms  identical")
    for name, s in stats.items():
        print(
            f"{name:<12} {s['tokens_per_s']:6.1f}  {s['tokens_per_step']:8.2f}  {s['proposal_ms']:11.2f}  "
            f"{s['identical']}/{len(prompts)}"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(stats, fh, indent=2)


if __name__ == "__main__":
    main()
