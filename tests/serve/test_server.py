"""The real server (uvicorn on a free loopback port) on the tiny random model, spoken to with the openai client.

Every answer must be exactly what the decoder produces for the same prompt and settings, alone or with other clients
at once; a client that goes away must free the model; bad requests get OpenAI's error JSON and a 4xx status.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from tiny_serving import MODEL_ID, CharTokenizer, tiny_decoder

from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.serve.app import create_app
from medusa_llama.serve.config import ServeConfig
from medusa_llama.serve.engine import DecoderEngine
from medusa_llama.serve.server import background_server
from medusa_llama.serve.text import fallback_chat_text

TOK = CharTokenizer()
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


class RecordingEngine(DecoderEngine):
    """The real engine, remembering every sequence it ran; ``delay`` slows each step down (seconds)."""

    def __init__(self, decoder, model_id):
        super().__init__(decoder, model_id)
        self.seen, self.delay = [], 0.0

    def step(self, batch):
        if self.delay:
            for seq in batch:
                seq.push = lambda new, push=seq.push, delay=self.delay: time.sleep(delay) or push(new)
        super().step(batch)
        self.seen.extend(batch)


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine (see conftest's one_thread)
    engine = RecordingEngine(tiny_decoder(), MODEL_ID)
    with background_server(create_app(engine, ServeConfig(max_tokens=24, stream_interval=0))) as url:
        yield SimpleNamespace(url=url, engine=engine)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(server):
    """A second decoder with the same weights: the direct answers (the server's model stays on its own thread)."""
    return tiny_decoder()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def expected(reference, ids: list[int], max_tokens: int, **sampling) -> tuple[str, object]:
    res = reference.generate(ids, GenerationConfig(max_new_tokens=max_tokens, **sampling))
    return TOK.decode(res.tokens), res


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_chat_equals_the_decoder(client, reference):
    ids = TOK(fallback_chat_text(CHAT))["input_ids"]
    text, res = expected(reference, ids, 40)
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=40)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 40, len(ids) + 40)
    stats = r.model_extra["medusa"]
    assert stats["decoder"] == "medusa"
    assert stats["steps"] == res.steps
    assert stats["mean_accepted_tokens"] == pytest.approx(res.mean_accepted, abs=1e-3)


def test_completion_equals_the_decoder(client, reference):
    prompt = "Once upon a time"
    text, _ = expected(reference, TOK(prompt)["input_ids"], 30)
    assert client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=30).choices[0].text == text
    ids = [5, 17, 33, 2, 60]  # token ids are a prompt too
    text, _ = expected(reference, ids, 30)
    assert client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=30).choices[0].text == text


def test_default_budget_is_the_servers(client):
    r = client.completions.create(model=MODEL_ID, prompt="abc")
    assert r.usage.completion_tokens == 24


def _streamed(client, chat: bool, **kw) -> tuple[str, list]:
    if chat:
        chunks = list(client.chat.completions.create(model=MODEL_ID, messages=CHAT, stream=True, **kw))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks
    chunks = list(client.completions.create(model=MODEL_ID, prompt="Once upon a time", stream=True, **kw))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_stream_concatenates_to_the_whole_answer(client, chat):
    if chat:
        whole = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=40)
        whole_text = whole.choices[0].message.content
    else:
        whole = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=40)
        whole_text = whole.choices[0].text
    text, chunks = _streamed(client, chat, max_tokens=40, stream_options={"include_usage": True})
    assert text == whole_text
    assert len(chunks) > 3  # really streamed: several steps' chunks
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "length"
    assert final[0].usage.completion_tokens == 40
    assert final[0].model_extra["medusa"] == whole.model_extra["medusa"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens  # include_usage
    assert len({c.id for c in chunks}) == 1


def test_stream_interval_batches_steps_into_fewer_chunks(reference):
    engine = RecordingEngine(tiny_decoder(), MODEL_ID)
    engine.delay = 0.005
    with background_server(create_app(engine, ServeConfig(stream_interval=0.05))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        chunks = list(client.completions.create(model=MODEL_ID, prompt="abc", max_tokens=60, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected(reference, TOK("abc")["input_ids"], 60)[0]
    assert 2 <= len(chunks) < engine.seen[0].calls / 2  # steps of 5+ ms, chunks at most every 50 ms


def test_raw_stream_is_server_sent_events(server):
    body = {"model": MODEL_ID, "prompt": "abc", "max_tokens": 10, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 10
    assert set(last["medusa"]) == {"decoder", "mean_accepted_tokens", "steps"}


def test_stop_strings_cut_the_text_and_end_generation(client, reference):
    prompt = "The weather today"
    ids = TOK(prompt)["input_ids"]
    full, _ = expected(reference, ids, 60)
    stop = full[30:33]
    cut = full.find(stop)
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=60, stop=[stop, "never seen \u00e9"])
    assert r.choices[0].text == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == cut + len(stop)  # one character per token: through the stop's last token
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=60, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_the_decoder(client, reference):
    ids = TOK(fallback_chat_text(CHAT))["input_ids"]
    text, _ = expected(reference, ids, 30, temperature=0.9, acceptance="sampling", seed=7)
    for _ in range(2):
        r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=30, temperature=0.9, seed=7)
        assert r.choices[0].message.content == text


def test_concurrent_clients_get_their_single_client_answers(server, reference):
    jobs = [(f"prompt number {i}", 20 + 7 * i, i % 2 == 0, i % 3 == 0) for i in range(6)]  # text, budget, chat, stream

    def ask(job) -> str:
        prompt, budget, chat, stream = job
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        if chat:
            msgs = [{"role": "user", "content": prompt}]
            if stream:
                chunks = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=budget, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return (
                client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=budget)
                .choices[0]
                .message.content
            )
        if stream:
            chunks = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=budget, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=budget).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, budget, chat, _), answer in zip(jobs, answers, strict=True):
        text = fallback_chat_text([{"role": "user", "content": prompt}]) if chat else prompt
        assert answer == expected(reference, TOK(text)["input_ids"], budget)[0]


def test_a_client_that_disconnects_frees_the_model(server, client):
    server.engine.delay = 0.002  # keep the long generation running while the client goes away
    try:
        body = {"model": MODEL_ID, "prompt": "a long story", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(4)][0].startswith("data: ")  # a few chunks, then hang up
        r = client.completions.create(model=MODEL_ID, prompt="next", max_tokens=5)
        assert r.usage.completion_tokens == 5
    finally:
        server.engine.delay = 0.0
    (gone,) = [s for s in server.engine.seen if s.config.max_new_tokens == 400]
    assert gone.finish_reason == "cancelled"
    assert gone.completion_tokens < 400


BAD = {
    "no messages": ("chat", {"model": MODEL_ID}, "messages"),
    "messages not a list": ("chat", {"messages": "hi"}, "messages"),
    "no message": ("chat", {"messages": []}, "messages"),
    "unknown role": ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    "content not text": ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    "max_tokens 0": ("completion", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    "max_tokens a string": ("completion", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    "max_tokens a float": ("completion", {"prompt": "a", "max_tokens": 5.5}, "max_tokens"),
    "temperature negative": ("completion", {"prompt": "a", "temperature": -0.5}, "temperature"),
    "temperature a string": ("chat", {"messages": CHAT, "temperature": "hot"}, "temperature"),
    "seed out of range": ("completion", {"prompt": "a", "seed": 2**70}, "seed"),
    "stream not a bool": ("completion", {"prompt": "a", "stream": "yes"}, "stream"),
    "stop not text": ("completion", {"prompt": "a", "stop": 5}, "stop"),
    "n 2": ("completion", {"prompt": "a", "n": 2}, "n"),
    "no prompt": ("completion", {"max_tokens": 3}, "prompt"),
    "empty prompt": ("completion", {"prompt": ""}, "prompt"),
    "token out of range": ("completion", {"prompt": [1, 96]}, "prompt"),
    "prompt too long": ("completion", {"prompt": "x" * 600}, "prompt"),
    "budget too long": ("completion", {"prompt": "abc", "max_tokens": 510}, "max_tokens"),
    "unknown model": ("completion", {"model": "gpt-4o", "prompt": "a"}, "model"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_openai_errors(server, name):
    kind, body, param = BAD[name]
    r = httpx.post(f"{server.url}/v1/{'chat/completions' if kind == 'chat' else 'completions'}", json=body)
    assert r.status_code == (404 if name == "unknown model" else 400), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "max_tokens": ', b"[1, 2]", b""],
    ids=["NaN", "truncated", "not an object", "empty"],
)
def test_malformed_bodies_get_openai_errors(server, raw):
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_errors_through_the_client_and_unknown_routes(server, client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # still serving
