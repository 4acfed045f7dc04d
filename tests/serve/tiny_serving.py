"""What the serving tests share: a character tokenizer for the tiny random model, how to build its decoder, and a
sink for one sequence's events."""

from __future__ import annotations

import threading

from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import MedusaDecoder
from medusa_llama.decode.tree import builtin_tree
from medusa_llama.serve.engine import Delta, Failed, Finished

MAX_SEQ_LEN = 512
MODEL_ID = "tiny"


class CharTokenizer(FakeTokenizer):
    """Token i is the character chr(32 + i): the tiny model's 96 tokens are the printable ASCII characters (and DEL),
    so every token sequence is text and back. No chat template: chats use the fallback prompt."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [min(max(ord(c) - 32, 0), 95) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i) for i in ids)


def tiny_decoder(tree: str = "tree16") -> MedusaDecoder:
    """A Medusa decoder on the tiny random Llama with random heads; every call builds the same weights."""
    backbone = make_backbone(tiny_llama(), CharTokenizer(), MODEL_ID, MAX_SEQ_LEN, "fast")
    return MedusaDecoder(backbone, random_heads(), builtin_tree(tree))


class Events:
    """A sink collecting one sequence's events; ``done`` is set by its last one."""

    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, event) -> None:
        self.items.append(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    @property
    def last(self):
        assert self.done.wait(30)
        return self.items[-1]

    def text(self) -> str:
        assert self.done.wait(60)
        return "".join(e.text for e in self.items if isinstance(e, Delta | Finished))
