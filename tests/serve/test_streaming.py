"""The streaming path's per-step batching: a step's tokens detokenized together (stop strings within or across
steps, half characters), the channel's wake-ups, and one chunk per step through the real server."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from types import SimpleNamespace

import openai
import pytest
from tiny_serving import CharTokenizer

from medusa_llama.decode.decoder import GenerationConfig, GenerationResult
from medusa_llama.serve.app import create_app
from medusa_llama.serve.channel import Channel
from medusa_llama.serve.config import ServeConfig
from medusa_llama.serve.engine import DecoderEngine, Delta, Finished
from medusa_llama.serve.server import background_server
from medusa_llama.serve.text import SharedTokenizer, TextStream

CHARS = SharedTokenizer(CharTokenizer())


class ByteTokenizer:
    """Token i is the byte i of UTF-8 text: a character of several bytes spans several tokens."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")


BYTES = SharedTokenizer(ByteTokenizer())


def steps_of(tok: SharedTokenizer, text: str, sizes: list[int]) -> list[list[int]]:
    """The token ids of ``text`` cut into steps of ``sizes`` tokens (cycled)."""
    ids, out, i = tok.encode(text), [], 0
    while i < len(ids):
        n = sizes[len(out) % len(sizes)]
        out.append(ids[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("sizes", [[1], [3], [2, 5, 1]])
def test_steps_give_the_text_of_the_tokens_in_order(sizes):
    text = "Multi-token steps arrive whole and in order."
    ts, deltas = TextStream(CHARS), []
    for step in steps_of(CHARS, text, sizes):
        assert ts.extend(step) == len(step)
        deltas.append(ts.delta())
    assert "".join(deltas) + ts.delta(final=True) == text
    assert deltas[0] == text[: sizes[0]]  # nothing held back without stop strings


@pytest.mark.parametrize("sizes", [[1], [2], [3], [4, 1], [7]])
def test_a_stop_string_within_or_across_steps_stops_at_its_last_token(sizes):
    text = "say hello END and more"
    ts, out = TextStream(CHARS, ["END"]), ""
    for step in steps_of(CHARS, text, sizes):
        taken = ts.extend(step)
        out += ts.delta()
        if ts.stopped:
            break
        assert taken == len(step)
    assert ts.stopped and out + ts.delta(final=True) == "say hello "
    assert len(ts.ids) == len("say hello END")  # the tokens after the stop's last one are not taken
    assert ts.extend(CHARS.encode("xyz")) == 0


def test_half_a_character_waits_for_the_next_step_and_ends_as_the_whole_decode():
    ts = TextStream(BYTES)
    fox = "🦊".encode()  # 4 bytes: 4 tokens
    ts.extend(list(b" a") + [fox[0]])
    assert ts.delta() == ""  # the step ends inside a character: its text waits
    ts.extend(list(fox[1:]) + list(b"b"))
    assert ts.delta() == " a🦊b"
    ts.extend([fox[0], fox[1]])  # the budget ends inside a character
    assert ts.delta() == "" and ts.delta(final=True) == BYTES.decode([fox[0], fox[1]])


def test_the_channel_wakes_the_loop_only_for_a_waiting_reader_and_at_the_end():
    loop = asyncio.new_event_loop()
    try:
        channel = Channel(loop)
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda fn, *a: wakes.append(a) or real(fn, *a)  # type: ignore[method-assign]

        async def read() -> list:
            return await channel.get()

        for k in range(3):  # the reader is busy elsewhere (e.g. waiting out stream_interval): no wake-ups
            channel.put(Delta(str(k)))
        assert wakes == []
        assert [e.text for e in loop.run_until_complete(read())] == ["0", "1", "2"]

        def worker() -> None:
            for k in range(3, 6):
                channel.put(Delta(str(k)))
            channel.put(Finished("length", "", 1, 6, 5, 1.0, 0.1))

        async def wait_then_read() -> list:
            task = asyncio.ensure_future(channel.get())
            await asyncio.sleep(0.01)  # parked in get()
            threading.Thread(target=worker).start()
            items, gets = await task, 1  # one step or more: all that had arrived
            while not isinstance(items[-1], Finished):
                items, gets = items + await channel.get(), gets + 1
            await channel.wait_end(5.0)  # returns at once: the end has come
            return items, gets

        items, gets = loop.run_until_complete(asyncio.wait_for(wait_then_read(), 10))
        assert [e.text for e in items] == ["3", "4", "5", ""] and isinstance(items[-1], Finished)
        assert channel.ended.is_set() and wakes[-1] == (True,)  # the end always wakes the loop
        assert len(wakes) - 1 <= gets  # otherwise at most one wake-up per get() that waited
    finally:
        loop.close()


class ScriptedDecoder:
    """``generate`` with the decoder's interface, emitting ``steps`` (lists of tokens) as they are, cut at the
    budget; the first step plays the prefill's token."""

    def __init__(self, steps: list[list[int]], step_s: float = 0.0):
        self.steps, self.step_s = steps, step_s
        self.backbone = SimpleNamespace(
            tokenizer=CharTokenizer(), name="scripted", vocab_size=96, max_seq_len=512, eos_token_ids=()
        )

    def generate(self, prompt_ids, config: GenerationConfig, on_tokens=None) -> GenerationResult:
        out: list[int] = []
        for step in self.steps:
            new = step[: config.max_new_tokens - len(out)]
            if not new:
                break
            time.sleep(self.step_s)
            out += new
            if on_tokens:
                on_tokens(new)
        return GenerationResult(tokens=out, steps=len(self.steps) - 1)


ANSWER = "Alpha beta. Gamma delta; epsilon!"
STEPS = steps_of(CHARS, ANSWER, [1, 3, 2, 4])


@pytest.fixture(scope="module")
def scripted():
    engine = DecoderEngine(ScriptedDecoder(STEPS, step_s=0.01), "scripted")
    app = create_app(engine, ServeConfig(stream_interval=0))
    with background_server(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_one_chunk_per_step_carrying_all_its_text(scripted):
    chunks = list(scripted.completions.create(model="scripted", prompt="go", max_tokens=100, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices[0].text]
    step_ends = set(itertools.accumulate(len(step) for step in STEPS))
    assert set(itertools.accumulate(len(t) for t in texts)) <= step_ends  # whole steps, in order
    assert len(texts) > len(STEPS) / 2  # steps 10 ms apart: mostly one chunk each (several where the loop lags)
    whole = scripted.completions.create(model="scripted", prompt="go", max_tokens=100)
    assert "".join(texts) == whole.choices[0].text == ANSWER
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == len(ANSWER)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_a_stop_string_across_two_steps_ends_the_stream(scripted, chat):
    stop = "a. Gam"  # from the middle of one step into the next
    assert not any(stop in CHARS.decode(step) for step in STEPS)
    if chat:
        msgs = [{"role": "user", "content": "go"}]
        chunks = list(scripted.chat.completions.create(model="scripted", messages=msgs, stop=stop, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        chunks = list(scripted.completions.create(model="scripted", prompt="go", stop=[stop], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
    assert text == ANSWER[: ANSWER.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == ANSWER.find(stop) + len(stop)
