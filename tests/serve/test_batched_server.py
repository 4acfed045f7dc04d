"""``serve --batch-size N``: the real server over a batched engine answers several clients at once, each exactly as
the single-sequence decoder would (fp32, greedy)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import random_heads
from tiny_serving import MODEL_ID, CharTokenizer, tiny_decoder

from medusa_llama.cli.serve import make_engine
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.decode.heads import MedusaHeads
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import SHIPPED_HEADS, DecoderOptions, Pipeline, default_heads_dir
from medusa_llama.serve.app import create_app
from medusa_llama.serve.config import ServeConfig
from medusa_llama.serve.engine import BatchedEngine, DecoderEngine
from medusa_llama.serve.server import background_server
from medusa_llama.serve.trees import read_table, table_path, trees_for_device


def tiny_pipeline(tree: str = "tree16") -> Pipeline:
    decoder = tiny_decoder(tree)
    return Pipeline(decoder.backbone, decoder.heads, decoder.tree, decoder, DecoderOptions(device="cpu"))


def test_batch_size_picks_the_engine():
    assert isinstance(make_engine(tiny_pipeline(), ServeConfig()), DecoderEngine)
    engine = make_engine(tiny_pipeline(), ServeConfig(batch_size=3))
    assert isinstance(engine, BatchedEngine) and engine.capacity == 3


def test_batched_serving_runs_prefix_heads(caplog):
    pipe = tiny_pipeline()
    pipe.heads = random_heads("sequential", prefix_attention=True, prefix_num_heads=4)
    with caplog.at_level("WARNING"):
        engine = make_engine(pipe, ServeConfig(batch_size=2))
    assert isinstance(engine, BatchedEngine) and engine.decoder.heads is pipe.heads  # the heads, not vanilla rows
    assert engine.decoder.prefix_cache is not None and "prefix attention" not in caplog.text


def test_the_shipped_heads_carry_a_batched_tree_table_for_each_device_type():
    """Batched serving without --heads takes the default heads (prefix attention and all) and the trees per batch
    size measured for them, one table per device type."""
    if default_heads_dir(None) != SHIPPED_HEADS:
        pytest.skip("the shipped heads are not installed")
    heads = MedusaHeads.load(SHIPPED_HEADS)
    table = read_table(table_path(SHIPPED_HEADS))
    for device_type in ("cuda", "cpu"):
        trees = trees_for_device(table, device_type)
        assert 1 in trees, device_type
        for choices in trees.values():  # every entry decodes with these heads: no deeper than they predict
            assert all(len(path) <= heads.num_heads for path in choices)


def test_batch_size_refuses_a_dynamic_tree():
    pipe = tiny_pipeline()
    pipe.tree = object()  # stands for a DynamicTree: anything that is not a static Tree
    with pytest.raises(MedusaError, match="static tree"):
        make_engine(pipe, ServeConfig(batch_size=2))


def test_batched_server_answers_each_client_as_alone(one_thread):
    engine = make_engine(tiny_pipeline(), ServeConfig(batch_size=3))
    reference = tiny_decoder()
    jobs = [(f"prompt {i}" + " more" * i, 8 + 5 * i) for i in range(5)]  # different lengths and budgets

    with background_server(create_app(engine, ServeConfig(stream_interval=0))) as url:

        def ask(job) -> str:
            prompt, budget = job
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=budget).choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
    tok = CharTokenizer()
    for (prompt, budget), answer in zip(jobs, answers, strict=True):
        ids = reference.generate(tok(prompt)["input_ids"], GenerationConfig(max_new_tokens=budget)).tokens
        assert answer == tok.decode(ids)
