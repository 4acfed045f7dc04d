"""How close a Medusa-2 (LoRA-adapted) backbone stays to the original model.

    python benchmarks/medusa2_quality.py --data DATA_DIR --adapter RUN/best|medusa2 [--prompts 40] [--new-tokens 128]

Prints one JSON line: validation perplexity of the original and the adapted model on the prepared validation split
(loss-masked tokens), and the greedy token agreement: the original model's greedy continuation of held-out prompts,
teacher-forced through the adapted model, and the share of positions where the adapted model's argmax agrees.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from medusa_llama.decode.decoder import GenerationConfig, VanillaDecoder
from medusa_llama.eval.prompts import chat_ids, load_prompts
from medusa_llama.pipeline import load_pipeline_backbone, resolve_adapter
from medusa_llama.train.blocks import TokenBlocks


@torch.no_grad()
def perplexity(hf, blocks: TokenBlocks, batches: int, batch_size: int) -> float:
    total, count = 0.0, 0.0
    for b in range(min(batches, math.ceil(len(blocks) / batch_size))):
        tokens, mask = blocks[list(range(b * batch_size, min(len(blocks), (b + 1) * batch_size)))]
        tokens, mask = tokens.to(hf.device), mask.to(hf.device)
        logits = hf(tokens[:, :-1]).logits.float()  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T-1)
        total += float((nll * mask[:, 1:]).sum())
        count += float(mask[:, 1:].sum())
    return math.exp(total / max(count, 1.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--adapter", required=True, help="an adapter directory, or a shipped one by name (medusa2)")
    ap.add_argument("--prompts", type=int, default=40, help="how many prompts")
    ap.add_argument("--prompt-file", default=None, help="a JSONL prompt file (default: the built-in held-out prompts)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--val-batches", type=int, default=40)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    base = load_pipeline_backbone(None, args.device, "float32")
    adapted = load_pipeline_backbone(None, args.device, "float32", adapter=resolve_adapter(args.adapter))
    blocks = TokenBlocks(args.data, "val")
    result = {
        "val_ppl_original": perplexity(base.hf_model, blocks, args.val_batches, 8),
        "val_ppl_adapted": perplexity(adapted.hf_model, blocks, args.val_batches, 8),
    }
    agree = total = 0
    same_text = 0
    prompts = load_prompts(args.prompt_file, limit=args.prompts)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    for p in prompts:
        ids = chat_ids(base.tokenizer, p.text)
        ref = VanillaDecoder(base).generate(ids, cfg).tokens
        seq = torch.tensor([ids + ref], device=adapted.device)
        pred = adapted.hf_model(seq).logits[0, len(ids) - 1 : -1].argmax(-1).tolist()  # adapted argmax per step
        agree += sum(int(a == b) for a, b in zip(pred, ref, strict=True))
        total += len(ref)
        same_text += int(VanillaDecoder(adapted).generate(ids, cfg).tokens == ref)
    result.update(
        greedy_token_agreement=agree / max(total, 1),
        identical_continuations=f"{same_text}/{len(prompts)}",
        prompts=len(prompts),
        device=str(base.device),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
