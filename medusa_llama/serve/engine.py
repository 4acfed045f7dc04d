"""Sequences and the engines that advance them.

A ``Sequence`` is one request's generation. The worker thread feeds it each step's new tokens (``push``); it turns
them into text, ends at a stop string or on cancellation, and hands events to the HTTP side through ``sink``
(``Delta``, then one ``Finished`` or ``Failed``). Its statistics follow ``GenerationResult``: a step is one verify
forward after the prefill, and mean accepted tokens per step counts the bonus token.

An ``Engine`` advances sequences on one model and is only ever called from the scheduler's worker thread, so the
model, its KV cache and its CUDA graphs are never used from two threads. ``DecoderEngine`` runs one sequence at a
time through ``decoder.generate``; ``BatchedEngine`` runs B sequences per verify step on a ``BatchedDecoder``,
one step per ``step`` call, so the scheduler refills finished rows between steps (continuous batching).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.errors import MedusaError
from medusa_llama.serve.text import SharedTokenizer, TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str
    """stop (EOS or a stop string) | length (token budget) | cancelled (client gone or server closing)."""
    text: str
    """The tail of the text not sent in a Delta yet."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated up to the end of the answer (through the token that completed a stop string)."""
    steps: int
    mean_accepted: float
    seconds: float
    """From the request's arrival: waiting in the queue included."""


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500


Event = Delta | Finished | Failed


class Sequence:
    """One request's generation: its prompt, settings, text state and the sink its events go to."""

    def __init__(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        text: TextStream,
        sink: Callable[[Event], None],
    ):
        self.prompt_ids, self.config, self.text, self.sink = prompt_ids, config, text, sink
        self.cancelled = threading.Event()  # set from any thread; the worker notices at the next step
        self.done = False
        self.finish_reason: str | None = None  # stop | length | cancelled, or error
        self.generated = 0  # tokens the decoder produced (statistics)
        self.completion_tokens = 0  # tokens up to the end of the answer (usage)
        self.calls = 0  # push() calls: the prefill's token, then one per step
        self.last_token: int | None = None
        self.t0 = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, tokens: list[int]) -> bool:
        """Take one step's new tokens (worker thread). False: stop feeding this sequence (a stop string or
        cancellation ended it)."""
        if self.cancelled.is_set():
            self.finish("cancelled")
            return False
        self.calls += 1
        self.generated += len(tokens)
        taken = self.text.extend(tokens)  # the whole step's tokens at once: through a stop string's last token
        if taken:
            self.completion_tokens += taken
            self.last_token = tokens[taken - 1]
        if self.text.stopped:
            self.finish("stop")
            return False
        delta = self.text.delta()
        if delta:
            self.sink(Delta(delta))
        return True

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done, self.finish_reason = True, reason
        steps = max(self.calls - 1, 0)
        mean = (self.generated - 1) / steps if steps else 1.0
        seconds = time.perf_counter() - self.t0
        tail = self.text.delta(final=True)
        self.sink(Finished(reason, tail, len(self.prompt_ids), self.completion_tokens, steps, mean, seconds))

    def fail(self, message: str, status: int = 500) -> None:
        if not self.done:
            self.done, self.finish_reason = True, "error"
            self.sink(Failed(message, status))


class Engine(ABC):
    """Advances sequences on one model. Called from one thread only: the scheduler's worker."""

    capacity: int = 1
    """How many sequences ``step`` may be given at once."""
    model_id: str
    kind: str
    """medusa | vanilla (reported with the statistics)."""
    tokenizer: SharedTokenizer
    vocab_size: int
    max_seq_len: int
    """The context: prompt plus new tokens."""

    @abstractmethod
    def room(self, prompt_len: int) -> int:
        """The most new tokens a sequence with this prompt may ask for (< 1: the prompt does not fit)."""

    @abstractmethod
    def step(self, batch: list[Sequence]) -> None:
        """Advance each sequence of ``batch`` (at most ``capacity``, admitted in order) by one or more decode steps,
        pushing the new tokens to it; every sequence that ends must be finished (or failed) before returning.

        A batched engine runs exactly one verify step for the whole batch (prefilling sequences it sees for the
        first time and freeing the state of those that end), so that the scheduler can admit waiting sequences
        between steps: continuous batching at step granularity. ``DecoderEngine`` runs its one sequence to the end.
        """


class _Ended(Exception):
    """Raised from the token callback to end a generation early (stop string, cancellation)."""


class DecoderEngine(Engine):
    """One sequence at a time on a ``VanillaDecoder`` or ``MedusaDecoder``."""

    capacity = 1

    def __init__(self, decoder: VanillaDecoder | MedusaDecoder, model_id: str | None = None):
        self.decoder = decoder
        self.backbone = decoder.backbone
        self.model_id = model_id or self.backbone.name or "medusa-llama"
        self.kind = "medusa" if isinstance(decoder, MedusaDecoder) else "vanilla"
        self.tokenizer = SharedTokenizer(self.backbone.tokenizer)
        self.vocab_size, self.max_seq_len = self.backbone.vocab_size, self.backbone.max_seq_len
        # the slack generate() checks for beyond the budget: two trees' worth of accepted tokens plus one tree
        tree = getattr(decoder, "tree", None)
        self._slack = 2 * (tree.max_depth + 1) + tree.size if tree is not None else 3

    def room(self, prompt_len: int) -> int:
        return self.backbone.max_seq_len - prompt_len - self._slack

    def step(self, batch: list[Sequence]) -> None:
        (seq,) = batch

        def on_tokens(new: list[int]) -> None:
            if not seq.push(new):
                raise _Ended

        try:
            self.decoder.generate(seq.prompt_ids, seq.config, on_tokens=on_tokens)
        except _Ended:
            return  # push() finished it
        except MedusaError as exc:
            seq.fail(str(exc), status=400)
            return
        eos = seq.config.stop_at_eos and seq.last_token in self.backbone.eos_token_ids
        seq.finish("stop" if eos else "length")


class BatchedEngine(Engine):
    """Up to ``capacity`` sequences per verify step on a ``BatchedDecoder``: each ``step`` prefills the sequences it
    sees for the first time into free rows (one ``add_many``), runs ONE batched decode step and frees the rows of
    those that end.

    All sequences of a batch share one acceptance rule (greedy, or one sampling setting): a sequence asking for
    another while others run fails with status 400."""

    def __init__(self, decoder: BatchedDecoder, model_id: str | None = None):
        self.decoder = decoder
        self.backbone = decoder.backbone
        self.capacity = decoder.capacity
        self.model_id = model_id or self.backbone.name or "medusa-llama"
        self.kind = decoder.kind
        self.tokenizer = SharedTokenizer(self.backbone.tokenizer)
        self.vocab_size, self.max_seq_len = self.backbone.vocab_size, self.backbone.max_seq_len
        self._rows: dict[Sequence, int] = {}  # the sequences holding a decoder row

    def room(self, prompt_len: int) -> int:
        return self.decoder.room(prompt_len)

    def step(self, batch: list[Sequence]) -> None:
        for seq in [s for s in self._rows if s.done or s not in batch]:  # ended or dropped since the last step
            self._release(seq)
        waiting = [s for s in batch if s not in self._rows and not s.done]
        try:  # all of them in one prefill forward
            rows: list[int | None] = self.decoder.add_many([s.prompt_ids for s in waiting], [s.config for s in waiting])
        except MedusaError:  # one is refused (add_many then changes nothing): admit them one by one, failing it alone
            rows = [self._add(seq) for seq in waiting]
        for seq, row in zip(waiting, rows, strict=True):
            if row is not None:
                self._rows[seq] = row
                self._push(seq, list(self.decoder.result(row).tokens))
        new = self.decoder.step()
        for seq, row in list(self._rows.items()):
            if row in new:
                self._push(seq, new[row])

    def _add(self, seq: Sequence) -> int | None:
        """Prefill one sequence into a free row; a refused one fails (status 400) and gets None."""
        try:
            return self.decoder.add(seq.prompt_ids, seq.config)
        except MedusaError as exc:
            seq.fail(str(exc), status=400)
            return None

    def _push(self, seq: Sequence, tokens: list[int]) -> None:
        """Hand a row's new tokens to its sequence; finish and free the row where the sequence or the row ended."""
        row = self._rows[seq]
        if not seq.push(tokens):  # a stop string or cancellation finished it
            self._release(seq)
        elif self.decoder.done(row):
            eos = seq.config.stop_at_eos and seq.last_token in self.backbone.eos_token_ids
            seq.finish("stop" if eos else "length")
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.decoder.release(self._rows.pop(seq))
