"""Self-distillation: the backbone's own greedy answers to chat prompts (Medusa, Sec. 2.3.2).

Two generators with one interface, ``answers(prompts) -> Iterator[(key, tokens)]``: ``prompts`` is an iterable of
``(key, prompt token ids)`` pulled lazily, and each answer comes back with its key as soon as it is finished (not in
prompt order), its tokens up to and including the first EOS, at most ``max_new_tokens``.

- ``FastAnswerer``: the project's ``BatchedDecoder`` without heads (vanilla, one token per step) on the fast
  backbone: continuous batching (finished rows take the next prompts at once, all prefilled by one ``add_many``),
  a CUDA graph per step on a GPU.
- ``HFAnswerer``: HF ``generate`` on left-padded batches, for models the fast backbone does not cover (the
  backbone falls back to the HF forward for any architecture it cannot reproduce exactly).

``key`` is anything (it comes back untouched). Both are greedy and pinned equal to HF greedy ``generate`` token for
token (fp32, tests/train/test_self_distill.py).
``load_answerer`` loads the model once through the decoding path (``load_pipeline_backbone``) and picks one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from medusa_llama.decode.backbone import FastBackbone
from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.errors import MedusaError

log = logging.getLogger(__name__)

DISTILL_BACKENDS = ("auto", "fast", "hf")


@dataclass
class DistillStats:
    """What self-distillation did, for the summary line and ``meta.json``."""

    generator: str = ""
    """fast (BatchedDecoder) or hf (HF generate)."""
    prompts: int = 0
    """Prompts answered."""
    answers: int = 0
    """Chats whose answer was replaced by the model's (an empty answer replaces nothing)."""
    new_tokens: int = 0
    """Tokens generated (EOS included)."""
    seconds: float = 0.0
    """Wall time from loading done to the last answer."""

    def rates(self) -> str:
        s = max(self.seconds, 1e-9)
        return f"{self.prompts / s:.1f} prompts/s, {self.new_tokens / s:.0f} tok/s"


def _until_eos(tokens: list[int], eos: frozenset[int], limit: int) -> list[int]:
    """``tokens`` cut after the first EOS (kept) and to ``limit``."""
    tokens = tokens[:limit]
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1]
    return tokens


class Progress:
    """A tqdm bar of answers with the generation rate in tokens/s."""

    def __init__(self, total: int | None, stats: DistillStats):
        self.bar = tqdm(total=total, desc=f"self-distill ({stats.generator})", unit="answer", leave=False)
        self.stats, self.t0 = stats, time.perf_counter()

    def update(self, answers: int, tokens: int) -> None:
        self.stats.prompts += answers
        self.stats.new_tokens += tokens
        self.stats.seconds = time.perf_counter() - self.t0
        self.bar.set_postfix(tok_s=f"{self.stats.new_tokens / max(self.stats.seconds, 1e-9):.0f}", refresh=False)
        if answers:
            self.bar.update(answers)

    def close(self) -> None:
        self.bar.close()


class FastAnswerer:
    """Greedy answers by ``BatchedDecoder`` (vanilla, continuous batching) on a ``FastBackbone``."""

    name = "fast"

    def __init__(self, backbone: FastBackbone, batch_size: int, max_new_tokens: int):
        self.decoder = BatchedDecoder(backbone, batch_size)
        self.config = GenerationConfig(max_new_tokens=max_new_tokens)
        self.eos = frozenset(backbone.eos_token_ids)

    def answers(
        self, prompts: Iterable[tuple[object, list[int]]], progress: Progress | None = None
    ) -> Iterator[tuple[object, list[int]]]:
        dec, waiting = self.decoder, iter(prompts)
        owner: dict[int, object] = {}  # row -> key
        exhausted = False
        while True:
            free = 0 if exhausted else len(dec.free_rows())
            items = list(itertools.islice(waiting, free))  # pulled lazily: the source is read as rows free up
            exhausted = exhausted or len(items) < free
            rows = dec.add_many([ids for _, ids in items], self.config)  # every free row in one prefill forward
            owner.update((row, key) for row, (key, _) in zip(rows, items, strict=True))
            if progress and rows:
                progress.update(0, len(rows))  # the prefills' tokens
            if not owner:
                return
            new = dec.step()
            finished = [r for r in owner if dec.done(r)]
            if progress:
                progress.update(len(finished), sum(map(len, new.values())))
            for row in finished:
                key, result = owner.pop(row), dec.release(row)
                yield key, result.tokens


class HFAnswerer:
    """Greedy answers by HF ``generate``, ``batch_size`` left-padded prompts at a time."""

    name = "hf"

    def __init__(self, hf_model, eos_ids: tuple[int, ...], pad_id: int, batch_size: int, max_new_tokens: int):
        self.model, self.pad_id = hf_model, pad_id
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.eos = frozenset(eos_ids)
        self.device = hf_model.get_input_embeddings().weight.device

    @torch.no_grad()
    def _generate(self, batch: list[tuple[object, list[int]]]) -> list[list[int]]:
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for _, ids in batch])  # (B, width)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch])  # (B, width)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(self.eos),
            pad_token_id=self.pad_id,
        )
        return [_until_eos(row, self.eos, self.max_new_tokens) for row in out[:, width:].tolist()]  # (B,) lists

    def answers(
        self, prompts: Iterable[tuple[object, list[int]]], progress: Progress | None = None
    ) -> Iterator[tuple[object, list[int]]]:
        waiting = iter(prompts)
        while batch := [item for _, item in zip(range(self.batch_size), waiting, strict=False)]:
            answers = self._generate(batch)
            if progress:
                progress.update(len(batch), sum(map(len, answers)))
            yield from ((key, answer) for (key, _), answer in zip(batch, answers, strict=True))


def load_answerer(
    model: str | None,
    backend: str,
    device: str | None,
    batch_size: int,
    max_new_tokens: int,
    max_prompt: int,
    pad_id: int,
) -> FastAnswerer | HFAnswerer:
    """Load the model once (bf16 on a GPU, fp32 on the CPU) and wrap it in the generator ``backend`` asks for:
    ``fast`` (an error if the fast backbone cannot reproduce the model), ``hf``, or ``auto`` (fast where it can)."""
    from medusa_llama.pipeline import load_pipeline_backbone

    if backend not in DISTILL_BACKENDS:
        raise ValueError(f"--distill-backend must be one of {DISTILL_BACKENDS}, got {backend!r}")
    # the cache holds the longest prompt, its answer, and the one-token step's slack (BatchedDecoder.add's check)
    seq_len = max_prompt + max_new_tokens + 3
    backbone = load_pipeline_backbone(model, device or "auto", "auto", seq_len, "hf" if backend == "hf" else backend)
    if isinstance(backbone, FastBackbone):
        return FastAnswerer(backbone, batch_size, max_new_tokens)
    if backend == "fast":
        raise MedusaError("the fast backbone does not cover this model: use --distill-backend hf")
    log.info("self-distillation with HF generate (the fast backbone does not cover %s)", backbone.name)
    return HFAnswerer(backbone.hf_model, backbone.eos_token_ids, pad_id, batch_size, max_new_tokens)
