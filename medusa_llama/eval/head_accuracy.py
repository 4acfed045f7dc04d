"""Per-head top-k accuracy on held-out prompts, measured the way the decoder sees the heads.

For each prompt: the backbone's greedy continuation (what greedy acceptance compares against), then one backbone
forward over prompt + continuation for the final hidden states h_t. At each continuation position t, head k
(1-based) ranks its candidates for token t+k+1; sequential heads walk the true continuation as their path (in a
tree, the accepted path is exactly the true tokens). ``accuracy[d][r]`` = P(head d+1's rank-r token is the true
token): per rank, not cumulative, the input of ``tree.grow_tree`` and the tree optimizer (Medusa, Sec. 2.3.3).

With a draft vocabulary (FR-Spec, ``heads.DraftVocab``) the heads are ranked as the decoder's proposal ranks them:
over the draft's N columns only (``heads.draft_topk``), so a true token outside the N is never a hit and ranks past
N are never hits either. Score with the draft vocabulary that decoding will use, or the optimizer expects too much.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa_llama.decode.heads import DraftVocab, MedusaHeads, draft_topk
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import DecoderOptions, check_output_file, device_name

log = logging.getLogger(__name__)

MAX_TOPK = 10


def _decoder_body(hf_model):
    """The transformer body (embeddings + layers + final norm) of an HF causal LM."""
    body = getattr(hf_model, "model", None)
    return body if isinstance(body, torch.nn.Module) else hf_model.base_model


@torch.inference_mode()
def head_rank_hits(
    hf_model,
    heads: MedusaHeads,
    ids: list[int],
    prompt_len: int,
    topk: int = MAX_TOPK,
    draft: DraftVocab | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit counts of one sequence: ``hits[d, r]`` = positions where head d+1's rank-r token was the true one,
    ``n[d]`` = positions scored for head d+1. ``ids`` = prompt + greedy continuation (``prompt_len`` prompt tokens).

    ``draft``: rank over this draft vocabulary's tokens only, as the decoder proposes (None: the full vocabulary).
    """
    k_heads, length = heads.num_heads, len(ids)
    hits = torch.zeros(k_heads, topk, dtype=torch.long)
    n = torch.zeros(k_heads, dtype=torch.long)
    first, last = prompt_len - 1, length - 2  # h_t for t in [first, last) has a target for head 1 (t + 2 < L)
    if last <= first:
        return hits, n
    device = next(hf_model.parameters()).device
    seq = torch.tensor([ids], device=device)  # (1, L)
    hidden = _decoder_body(hf_model)(input_ids=seq).last_hidden_state  # (1, L, D)
    emb = hf_model.get_input_embeddings()
    dtype = next(heads.parameters()).dtype
    # The prefix layer's token input (if any) reads e(x_{t+1}); the last position repeats its own token (unscored).
    next_emb = emb(torch.cat([seq[:, 1:], seq[:, -1:]], dim=1)).to(dtype) if heads.config.prefix_token_input else None
    hidden = heads.head_inputs(hidden.to(dtype), next_emb)[0, first:last]  # (N, D), N = last - first
    pos = torch.arange(first, last, device=device)  # (N,) position t of each state
    lm_head = hf_model.get_output_embeddings()
    ranked = topk if draft is None else min(topk, draft.size)  # a draft of N < topk tokens has no rank past N
    # path_emb[k, i] = e(x_{t+k+1}): the true token before head k+1's target (clamped past the end, masked below)
    path_idx = (pos[None, :] + torch.arange(1, k_heads + 1, device=device)[:, None]).clamp(max=length - 1)  # (K, N)
    path_emb = emb(seq[0][path_idx]).to(hidden.dtype)  # (K, N, D)
    states = heads.chain_states(hidden, path_emb)  # K x (N, D)
    for k, state in enumerate(states):
        target_idx = pos + k + 2  # (N,) head k+1 predicts x_{t+k+2} (0-based k)
        valid = target_idx < length
        if not bool(valid.any()):
            continue
        top = draft_topk(heads, k, state[valid], lm_head, ranked, draft)  # (N_k, ranked) token ids, best first
        match = top == seq[0][target_idx[valid]][:, None]  # (N_k, ranked): at most one True per row
        hits[k, :ranked] += match.sum(0).cpu()
        n[k] += int(valid.sum())
    return hits, n


def measure_head_accuracy(
    backbone,
    heads: MedusaHeads,
    prompt_ids: list[list[int]],
    max_new_tokens: int = 128,
    topk: int = MAX_TOPK,
    progress: bool = True,
    draft: DraftVocab | None = None,
) -> dict:
    """Greedy continuations with ``VanillaDecoder``, then per-head, per-rank accuracy over all of them.

    ``draft``: score the heads over this draft vocabulary, as decoding with it proposes (None: the full vocabulary;
    ``decoding_draft`` gives the one a pipeline decodes with). The report's ``draft_vocab`` is its size, 0 for none.
    """
    from tqdm.auto import tqdm

    from medusa_llama.decode.decoder import GenerationConfig, VanillaDecoder

    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"--topk must be in 1..{MAX_TOPK}, got {topk}")
    decoder = VanillaDecoder(backbone)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    hits = torch.zeros(heads.num_heads, topk, dtype=torch.long)
    n = torch.zeros(heads.num_heads, dtype=torch.long)
    new_tokens = 0
    for ids in tqdm(prompt_ids, desc="head accuracy", unit="prompt", disable=not progress):
        cont = decoder.generate(list(ids), gen).tokens
        new_tokens += len(cont)
        h, c = head_rank_hits(backbone.hf_model, heads, list(ids) + list(cont), len(ids), topk, draft)
        hits += h
        n += c
    if int(n.min()) == 0:
        raise MedusaError("too few continuation tokens to score every head: use more prompts or --max-new-tokens")
    acc = hits.double() / n.double()[:, None]  # (K, topk) per rank
    return {
        "accuracy": acc.tolist(),
        "top_k_cumulative": acc.cumsum(-1).tolist(),
        "positions": n.tolist(),
        "num_prompts": len(prompt_ids),
        "new_tokens": new_tokens,
        "topk": topk,
        "draft_vocab": 0 if draft is None else draft.size,
    }


def decoding_draft(pipe) -> DraftVocab | None:
    """The draft vocabulary that decoding with ``pipe``'s options proposes from (``--draft-vocab``: None, the heads'
    stored one; N, its first N; 0, none), built as ``MedusaDecoder`` builds it, so accuracy is scored alike."""
    return pipe.heads.draft(pipe.backbone.lm_head, pipe.options.draft_vocab)


def format_accuracy(report: dict) -> str:
    """A small text table of cumulative top-1/3/5/10 accuracy per head."""
    cum = report["top_k_cumulative"]
    ks = [k for k in (1, 3, 5, 10) if k <= len(cum[0])]
    lines = ["head  " + "  ".join(f"top-{k:<3d}" for k in ks) + "  positions"]
    for d, row in enumerate(cum):
        lines.append(f"{d + 1:>4d}  " + "  ".join(f"{row[k - 1]:7.3f}" for k in ks) + f"  {report['positions'][d]:9d}")
    return "\n".join(lines)


@dataclass
class HeadAccuracyConfig(DecoderOptions):
    """``heads-accuracy``: the decoder options (no tree: the heads are scored on their own), then:"""

    prompts: str | None = None
    """JSONL prompt file (default: the built-in held-out ShareGPT prompts)."""
    limit: int = 40
    """Number of prompts."""
    skip: int = 0
    """Drop this many prompts first (e.g. to stay disjoint from the benchmark prompts)."""
    max_new_tokens: int = 128
    """Length of each greedy continuation that the heads are scored on."""
    topk: int = MAX_TOPK
    """Ranks scored per head (at most 10)."""
    out: str = "heads_accuracy.json"
    """Where to write the accuracy report (the tree optimizer's --accuracy input)."""

    def __post_init__(self):
        super().__post_init__()
        if self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.skip < 0:
            raise ValueError(f"--skip must be >= 0, got {self.skip}")
        if self.max_new_tokens < 4:
            raise ValueError(f"--max-new-tokens must be >= 4, got {self.max_new_tokens}")
        if not 1 <= self.topk <= MAX_TOPK:
            raise ValueError(f"--topk must be in 1..{MAX_TOPK}, got {self.topk}")


def run_head_accuracy(cfg: HeadAccuracyConfig) -> dict:
    """The `heads-accuracy` command: measure and write ``cfg.out``."""
    from medusa_llama.eval.prompts import chat_ids, load_prompts
    from medusa_llama.pipeline import load_pipeline

    check_output_file(cfg.out, "--out")
    prompts = load_prompts(cfg.prompts, limit=cfg.limit, skip=cfg.skip)
    pipe = load_pipeline(cfg, need_heads=True)
    backbone, heads = pipe.backbone, pipe.heads
    ids = [chat_ids(backbone.tokenizer, p.text) for p in prompts]
    report = measure_head_accuracy(backbone, heads, ids, cfg.max_new_tokens, cfg.topk, draft=decoding_draft(pipe))
    report.update(model=backbone.name, heads=str(cfg.heads or "default"), device=device_name(backbone.device))
    report["max_new_tokens"] = cfg.max_new_tokens
    report["prompt_ids"] = [p.id for p in prompts]
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=1))
    return report
