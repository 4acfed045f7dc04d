"""The batched engine behind the scheduler: several requests at once give each the text a single-sequence engine
gives it; rows freed by finished or cancelled requests are refilled."""

from __future__ import annotations

from conftest import random_heads
from tiny_serving import Events, tiny_decoder

from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.decode.tree import builtin_tree
from medusa_llama.serve.engine import BatchedEngine, Sequence
from medusa_llama.serve.scheduler import Scheduler
from medusa_llama.serve.text import TextStream


def test_batched_engine_matches_single_sequence_decoding(one_thread):
    single = tiny_decoder("tree16")
    engine = BatchedEngine(BatchedDecoder(single.backbone, 2, random_heads(), builtin_tree("tree16")), "tiny")
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46], [9] * 12, [70, 5]]
    budgets = [20, 6, 14, 9]
    refs = [
        engine.tokenizer.decode(single.generate(p, GenerationConfig(max_new_tokens=m, stop_at_eos=False)).tokens)
        for p, m in zip(prompts, budgets, strict=True)
    ]
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        events = []
        for p, m in zip(prompts, budgets, strict=True):
            ev = Events()
            cfg = GenerationConfig(max_new_tokens=m, stop_at_eos=False)
            scheduler.submit(Sequence(p, cfg, TextStream(engine.tokenizer), ev))
            events.append(ev)
        assert [ev.text() for ev in events] == refs
        assert all(ev.items[-1].reason == "length" for ev in events)
        assert [ev.items[-1].completion_tokens for ev in events] == budgets
    finally:
        scheduler.close()
    assert not engine._rows and len(engine.decoder.free_rows()) == 2  # every row was given back
