"""Self-distillation generators: the batched decoder's greedy answers equal HF greedy generate's, token for token."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from medusa_llama.decode.backbone import FastBackbone
from medusa_llama.train.self_distill import DistillStats, FastAnswerer, HFAnswerer, Progress
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 12
LENGTHS = (3, 9, 1, 17, 6, 12, 4)


class EosTokenizer:
    def __init__(self, eos: int | None):
        self.eos_token_id = eos


def hf_greedy(model, prompt: list[int], eos: int | None) -> list[int]:
    """The reference: HF greedy ``generate``, one unpadded prompt at a time."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def case():
    """A tiny random model, prompts of different lengths, and an EOS id chosen from the model's own greedy output so
    that some answers stop at it, others run to ``max_new_tokens``, and one is EOS at once (done at the prefill)."""
    model = tiny_llama(seed=0)
    model.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in LENGTHS]
    free = [hf_greedy(model, p, None) for p in prompts]
    counts = Counter(t for answer in free for t in set(answer[1:]))
    eos = counts.most_common(1)[0][0]  # mid-answer in the most answers
    i = next(i for i, a in enumerate(free) if eos in a[1:])
    prompts.append(prompts[i] + free[i][: free[i].index(eos, 1)])  # its next greedy token is the EOS
    model.generation_config.eos_token_id = eos
    expected = [hf_greedy(model, p, eos) for p in prompts]
    assert expected[-1] == [eos]
    assert any(1 < len(e) < NEW for e in expected) and any(len(e) == NEW and eos not in e for e in expected)
    return model, prompts, eos, expected


def test_fast_answerer_equals_hf_generate(case):
    model, prompts, eos, expected = case
    backbone = FastBackbone(model, EosTokenizer(eos), "tiny", max_seq_len=2 * max(LENGTHS) + 2 * NEW + 3)
    stats = DistillStats(generator="fast")
    progress = Progress(len(prompts), stats)
    got = dict(FastAnswerer(backbone, batch_size=3, max_new_tokens=NEW).answers(enumerate(prompts), progress))
    progress.close()
    assert [got[i] for i in range(len(prompts))] == expected  # batch 3 < 7 prompts: rows are refilled
    assert stats.prompts == len(prompts) and stats.new_tokens == sum(map(len, expected))


def test_hf_answerer_equals_hf_generate(case):
    model, prompts, eos, expected = case
    answerer = HFAnswerer(model, (eos,), pad_id=0, batch_size=3, max_new_tokens=NEW)  # left-padded batches
    got = dict(answerer.answers(enumerate(prompts)))
    assert [got[i] for i in range(len(prompts))] == expected


def test_prompts_are_pulled_lazily(case):
    """The fast generator reads no further than it has free rows (prepare streams a whole corpus through it)."""
    model, prompts, eos, _ = case
    backbone = FastBackbone(model, EosTokenizer(eos), "tiny", max_seq_len=2 * max(LENGTHS) + 2 * NEW + 3)
    pulled = []

    def source():
        for i, p in enumerate(prompts):
            pulled.append(i)
            yield i, p

    answers = FastAnswerer(backbone, batch_size=2, max_new_tokens=NEW).answers(source())
    next(answers)
    assert len(pulled) <= 3  # two rows, plus at most one refill pulled while the first answer finished
