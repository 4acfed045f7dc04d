"""The benchmark code paths of issue 10 on the tiny model: many streaming clients against the real server, the
bf16-agreement pairs (all identical in fp32), and the tree-table measurement and choice."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tiny_serving import tiny_decoder

from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig, VanillaDecoder
from medusa_llama.serve.bench import measure_server_throughput
from medusa_llama.serve.engine import BatchedEngine

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
PROMPTS = [[1, 2, 3], list(range(40, 70)), [5] * 11, list(range(10, 17)), [60, 61], list(range(20, 45))]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("medusa", [True, False])
def test_concurrent_clients_get_every_token(one_thread, medusa):
    dec = tiny_decoder()
    bb = dec.backbone
    engine = BatchedEngine(BatchedDecoder(bb, 3, dec.heads if medusa else None, dec.tree))
    r = measure_server_throughput(engine, PROMPTS, concurrency=3, max_tokens=20)
    cfg = GenerationConfig(max_new_tokens=20)
    assert r.requests == len(PROMPTS) and r.tokens == sum(len(dec.generate(p, cfg).tokens) for p in PROMPTS)
    assert r.tokens_per_s > 0 and r.steps > 0
    assert (r.mean_accepted > 1.0) if medusa else r.mean_accepted == pytest.approx(1.0)


def test_fp32_agreement_is_complete(one_thread):
    agree = script("batch_agreement")
    dec = tiny_decoder()
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    outputs = agree.decode_all(dec.backbone, dec, VanillaDecoder(dec.backbone), dec.heads, dec.tree, PROMPTS, 4, cfg)
    for name, r in agree.report(outputs).items():
        assert r == {"identical": 1.0, "token_agreement": 1.0, "outputs": len(PROMPTS)}, name


def test_agreement_counts_the_common_prefix():
    agree = script("batch_agreement")
    r = agree.agreement([[1, 2, 3, 4], [1, 2], [7]], [[1, 2, 9, 9], [1, 2], [8, 8]])
    assert r["identical"] == pytest.approx(1 / 3)
    assert r["token_agreement"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_tree_table_measurement_and_choice(one_thread):
    bench = script("batch_throughput")
    dec = tiny_decoder()
    default = [[0], [1], [0, 0], [2], [0, 1]]
    trees = {"vanilla": [], **bench.candidate_trees(["default", "3", "9"], default)}
    assert trees == {"vanilla": [], "default(6)": default, "prefix3": [[0], [1]]}  # 9 >= the default: not a prefix
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    m = bench.measure(dec.backbone, dec.heads, trees["prefix3"], 2, PROMPTS[:3], cfg)
    assert m["tree_size"] == 3 and m["tokens"] == 36 and m["tokens_per_s"] > 0
    row = {
        "trees": trees,
        "candidates": {
            "vanilla": {"tokens_per_s": 100.0},
            "default(6)": {"tokens_per_s": 102.0},
            "prefix3": {"error": "boom"},
        },
    }
    assert bench.choose(row, margin=0.03) == ("vanilla", [])  # 2% is within the noise margin
    row["candidates"]["default(6)"]["tokens_per_s"] = 150.0
    assert bench.choose(row, margin=0.03) == ("default(6)", default)
    row["candidates"]["vanilla"] = {"error": "boom"}
    assert bench.choose(row, margin=0.03) == ("vanilla", [])  # no vanilla figure: no proof a tree pays


def test_serve_overhead_benchmark_runs_on_a_synthetic_decoder():
    from tiny_serving import CharTokenizer

    bench = script("serve_overhead")
    decoder = bench.SyntheticDecoder(CharTokenizer(), step_s=0.0005, per_step=3)
    res = decoder.generate([1, 2], GenerationConfig(max_new_tokens=10))
    assert len(res.tokens) == 10 and res.steps == 3  # the prefill's token, then steps of 3
    m = bench.measure(decoder, requests=2, max_tokens=40, stream_interval=0.0)
    assert m.tokens == 80 and m.direct_tokens_per_s > 0 and 0 < m.ratio < 2 and m.chunks >= 2
