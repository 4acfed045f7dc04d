"""The scheduler and the engine without HTTP: finish reasons, cancellation, failures, shutdown."""

from __future__ import annotations

import threading
import time

import pytest
from tiny_serving import Events, tiny_decoder

from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.serve.engine import DecoderEngine, Engine, Failed, Finished, Sequence
from medusa_llama.serve.scheduler import QueueFull, Scheduler
from medusa_llama.serve.text import TextStream


def sequence(engine: Engine, ids: list[int], budget: int = 12, stops=None) -> tuple[Sequence, Events]:
    events = Events()
    cfg = GenerationConfig(max_new_tokens=budget)
    return Sequence(ids, cfg, TextStream(engine.tokenizer, stops), events), events


@pytest.fixture(scope="module")
def engine():
    return DecoderEngine(tiny_decoder(), "tiny")


def test_engine_finishes_at_the_budget_or_at_eos(engine, one_thread):
    ref = engine.decoder.generate([1, 2, 3], GenerationConfig(max_new_tokens=12, stop_at_eos=False)).tokens
    seq, events = sequence(engine, [1, 2, 3])
    engine.step([seq])
    assert isinstance(events.last, Finished) and events.last.reason == "length"
    assert events.last.completion_tokens == 12
    eos = engine.backbone.eos_token_ids
    engine.backbone.eos_token_ids = (ref[5],)
    try:
        seq, events = sequence(engine, [1, 2, 3])
        engine.step([seq])
    finally:
        engine.backbone.eos_token_ids = eos
    assert events.last.reason == "stop" and events.last.completion_tokens == ref.index(ref[5]) + 1


class FlakyEngine(Engine):
    """Fails sequences whose prompt starts with 0; finishes the others at once; records the order it ran them."""

    capacity, model_id, kind, vocab_size, max_seq_len = 1, "flaky", "vanilla", 96, 64

    def __init__(self, tokenizer):
        self.tokenizer, self.ran, self.gate = tokenizer, [], threading.Event()
        self.gate.set()

    def room(self, prompt_len: int) -> int:
        return self.max_seq_len - prompt_len

    def step(self, batch):
        self.gate.wait(30)
        (seq,) = batch
        self.ran.append(seq.prompt_ids[0])
        if seq.prompt_ids[0] == 0:
            raise RuntimeError("boom")
        seq.push([7])
        seq.finish("length")


def test_a_failing_sequence_fails_alone_and_cancelled_waiters_never_run(engine):
    flaky = FlakyEngine(engine.tokenizer)
    scheduler = Scheduler(flaky, max_waiting=3)
    scheduler.start()
    try:
        flaky.gate.clear()  # hold the worker on the first sequence while the others queue up
        seqs = [sequence(flaky, [i]) for i in (1, 0, 2, 3)]
        scheduler.submit(seqs[0][0])
        while scheduler.waiting:  # the worker took it
            time.sleep(0.001)
        for seq, _ in seqs[1:]:
            scheduler.submit(seq)
        with pytest.raises(QueueFull):
            scheduler.submit(sequence(flaky, [4])[0])
        seqs[2][0].cancel()
        flaky.gate.set()
        assert [type(ev.last).__name__ for _, ev in seqs] == ["Finished", "Failed", "Finished", "Finished"]
        assert "boom" in seqs[1][1].last.message and seqs[2][1].last.reason == "cancelled"
        assert flaky.ran == [1, 0, 3]
    finally:
        scheduler.close()


def test_close_fails_the_waiting_and_refuses_new_sequences(engine):
    flaky = FlakyEngine(engine.tokenizer)
    scheduler = Scheduler(flaky)
    scheduler.start()
    flaky.gate.clear()
    running, waiting = sequence(flaky, [1]), sequence(flaky, [2])
    scheduler.submit(running[0])
    scheduler.submit(waiting[0])
    threading.Timer(0.2, flaky.gate.set).start()
    scheduler.close()
    assert isinstance(waiting[1].last, Failed) and waiting[1].last.status == 503
    assert running[1].done.is_set()
    with pytest.raises(RuntimeError, match="shutting down"):
        scheduler.submit(sequence(flaky, [3])[0])
