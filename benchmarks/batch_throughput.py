"""Throughput of batched Medusa against batched vanilla decoding at several batch sizes (issue 10, item 4).

Both decoders run the same held-out prompts on the same backbone, B sequences per step, rows refilled as sequences
finish (continuous batching); greedy, so every output must equal its batch-size-1 output (checked in fp32 by the
tests; counted here as agreement). Prints a table and writes JSON:

    python benchmarks/batch_throughput.py --batch-sizes 1,4,8,16,32 --prompts 64 --max-new-tokens 256 --out r.json

Where Medusa stops paying as B grows is where the server should switch to a smaller tree or to vanilla decoding.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.eval.prompts import chat_ids, load_prompts
from medusa_llama.pipeline import DecoderOptions, device_name, load_pipeline


def timed(decoder: BatchedDecoder, prompts: list[list[int]], cfg: GenerationConfig) -> tuple[float, list]:
    """Seconds to decode every prompt (device synchronised), and the results."""
    if decoder.backbone.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = decoder.generate_many(prompts, cfg)
    if decoder.backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4,8,16,32", help="comma-separated batch sizes")
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts per batch size")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--tree", default=None, help="a static tree (default: the one saved beside the heads)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    pipe = load_pipeline(DecoderOptions(tree=args.tree, device=args.device, backend="fast"), need_heads=True)
    bb = pipe.backbone
    prompts = [chat_ids(bb.tokenizer, p.text) for p in load_prompts(None, limit=args.prompts)]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    rows = []
    for b in sizes:
        medusa = BatchedDecoder(bb, b, pipe.heads, pipe.tree)
        vanilla = BatchedDecoder(bb, b)
        timed(medusa, prompts[: min(b, len(prompts))], GenerationConfig(max_new_tokens=8))  # warm-up, graph capture
        timed(vanilla, prompts[: min(b, len(prompts))], GenerationConfig(max_new_tokens=8))
        t_v, res_v = timed(vanilla, prompts, cfg)
        t_m, res_m = timed(medusa, prompts, cfg)
        tokens_v = sum(len(r.tokens) for r in res_v)
        tokens_m = sum(len(r.tokens) for r in res_m)
        steps = sum(r.steps for r in res_m)
        row = {
            "batch_size": b,
            "vanilla_tokens_per_s": tokens_v / t_v,
            "medusa_tokens_per_s": tokens_m / t_m,
            "speedup": (tokens_m / t_m) / (tokens_v / t_v),
            "mean_accepted_tokens": (tokens_m - len(res_m)) / steps if steps else 1.0,
            "identical_outputs": sum(a.tokens == v.tokens for a, v in zip(res_m, res_v, strict=True)),
            "prompts": len(prompts),
        }
        rows.append(row)
        print(
            f"B={b:3d}  vanilla {row['vanilla_tokens_per_s']:9.1f} tok/s  medusa {row['medusa_tokens_per_s']:9.1f} "
            f"tok/s  speedup {row['speedup']:.2f}x  accepted/step {row['mean_accepted_tokens']:.2f}  "
            f"identical {row['identical_outputs']}/{len(prompts)}",
            flush=True,
        )
    report = {
        "device": device_name(bb.device),
        "dtype": str(bb.dtype),
        "tree_size": pipe.tree.size if pipe.tree is not None else 1,
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
