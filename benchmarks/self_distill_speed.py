"""Self-distillation generators side by side: HF ``generate`` on left-padded batches (the old path) against the batched
decoder (continuous batching), same model, same prompts, one run. Prints answers/s, tokens/s and how many answers agree.

    python benchmarks/self_distill_speed.py --prompts 16 --max-new-tokens 64          # CPU, embedded model, fp32
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from medusa_llama.loading import load_tokenizer
from medusa_llama.pipeline import load_pipeline_backbone
from medusa_llama.train.self_distill import DistillStats, FastAnswerer, HFAnswerer, Progress
from medusa_llama.train.sources import SkipCounter, iter_source


def sharegpt_prompts(tokenizer, n: int, max_prompt: int) -> list[list[int]]:
    """The first ``n`` ShareGPT first-turn prompts (chat template applied) of at most ``max_prompt`` tokens."""
    out = []
    for record in itertools.islice(iter_source("sharegpt", SkipCounter()), 10 * n):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": record.first_prompt()}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt:
            out.append(ids)
        if len(out) == n:
            break
    return out


def run(answerer, prompts) -> tuple[DistillStats, list[list[int]]]:
    stats = DistillStats(generator=answerer.name)
    progress = Progress(len(prompts), stats)
    t0 = time.perf_counter()
    got = dict(answerer.answers(enumerate(prompts), progress))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - t0
    progress.close()
    return stats, [got[i] for i in range(len(prompts))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    tokenizer = load_tokenizer(args.model)
    prompts = sharegpt_prompts(tokenizer, args.prompts, args.max_prompt)
    seq = args.max_prompt + args.max_new_tokens + 3
    backbone = load_pipeline_backbone(args.model, args.device, "auto", seq, "fast")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf = HFAnswerer(backbone.hf_model, backbone.eos_token_ids, pad, args.batch_size, args.max_new_tokens)
    fast = FastAnswerer(backbone, args.batch_size, args.max_new_tokens)
    lengths = [len(q) for q in prompts]
    print(
        f"{len(prompts)} prompts ({min(lengths)}-{max(lengths)} tokens), {args.max_new_tokens} new tokens, "
        f"batch {args.batch_size}, {backbone.device} {backbone.dtype}, {torch.get_num_threads()} threads"
    )
    results = {}
    for answerer in (hf, fast):
        stats, answers = run(answerer, prompts)
        results[answerer.name] = (stats, answers)
        print(
            f"{answerer.name:>4}: {stats.prompts} answers, {stats.new_tokens} tokens in {stats.seconds:.2f} s: "
            f"{stats.rates()}"
        )
    (h, ha), (f, fa) = results["hf"], results["fast"]
    same = sum(a == b for a, b in zip(ha, fa, strict=True))
    print(
        f"fast / hf: {(f.new_tokens / f.seconds) / (h.new_tokens / h.seconds):.2f}x tokens/s, "
        f"{h.seconds / f.seconds:.2f}x wall; identical answers {same}/{len(prompts)}"
    )


if __name__ == "__main__":
    main()
