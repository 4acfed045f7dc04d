"""Text in and out of the model: prompts into token ids, and new tokens into text deltas that end at a stop string.

The tokenizer is shared by the HTTP side (encoding prompts) and the worker thread (decoding new tokens). Fast
tokenizers are Rust objects that refuse concurrent mutable use ("Already borrowed"), so every call goes through one
lock in ``SharedTokenizer``; each call is short (microseconds to a millisecond).
"""

from __future__ import annotations

import threading

from medusa_llama.errors import MedusaError


def fallback_chat_text(messages: list[dict]) -> str:
    """The prompt for a tokenizer without a chat template: one ``role: content`` line per message, then the cue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class SharedTokenizer:
    """A tokenizer used from several threads, one call at a time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat (``[{"role", "content"}]``) with the generation prompt; the tokenizer's chat template
        where it has one, else ``fallback_chat_text``. A template that rejects the conversation raises MedusaError."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            return self.encode(fallback_chat_text(messages))
        with self._lock:
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as exc:  # jinja2's TemplateError and friends: the template refuses these messages
                raise MedusaError(f"the chat template rejects these messages: {exc}") from exc
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """New tokens in, text deltas out; the text ends before the first stop string.

    Decoding is incremental (the window method of HF's TextStreamer and TGI): only the tokens since the last emitted
    text, plus the tokens before them for context (SentencePiece's leading spaces), are decoded again, once per
    decode step (``extend``), and text is emitted only once it no longer ends in half a UTF-8 character. Text that
    could still become a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer: SharedTokenizer, stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops or [] if s]
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already in self.text (the context window)
        self._read = 0
        self.text = ""  # all text so far, cut at a stop string
        self._sent = 0  # characters of self.text already handed out by delta()
        self.stopped = False  # a stop string was found (generation should end)

    def add(self, token: int) -> None:
        """Take one new token. Once ``stopped`` is set, later tokens are ignored."""
        self.extend([token])

    def extend(self, tokens: list[int]) -> int:
        """Take one decode step's new tokens, decoding them together (two tokenizer calls per step, not per token).

        Returns how many were taken: all of them, or, when a stop string ends among them, those through the token
        that completed it (``stopped`` is then set; found by taking that step's tokens again one at a time)."""
        if self.stopped or not tokens:
            return 0
        before = (len(self.ids), self._prefix, self._read, self.text)
        self._take(tokens)
        if not self.stopped or len(tokens) == 1:
            return len(tokens)
        n_ids, self._prefix, self._read, self.text = before  # rare: once per answer at most
        del self.ids[n_ids:]
        self.stopped = False
        for taken, tok in enumerate(tokens, start=1):
            self._take([tok])
            if self.stopped:
                return taken
        return len(tokens)  # never reached with a consistent tokenizer: the text is the same token by token

    def _take(self, tokens: list[int], final: bool = False) -> None:
        """Append ``tokens`` and their text, unless it is not printable yet; ``final``: all of it, whatever it is
        (the end of the generation: half a character decodes to U+FFFD, as the whole answer decoded at once)."""
        self.ids += tokens
        done = self.tokenizer.decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        now = self.tokenizer.decode(self.ids[self._prefix :])
        if len(now) <= len(done) or (now.endswith("\ufffd") and not final):
            return  # nothing printable yet (special tokens, or part of a multi-byte character)
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += now[len(done) :]
        self._prefix, self._read = self._read, len(self.ids)
        if self.stops:
            cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True

    def delta(self, final: bool = False) -> str:
        """The text not yet handed out; while not ``final``, minus a tail that may be the start of a stop string."""
        if final and not self.stopped and self._read < len(self.ids):
            self._take([], final=True)  # the tokens still held back as unprintable
        end = len(self.text)
        if not final and not self.stopped:
            end -= _partial_stop(self.text, self.stops)
        out = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return out


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string (0 if none)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
