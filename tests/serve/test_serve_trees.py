"""The server's tree per batch size: the table lookup (largest key <= B), an empty entry served as vanilla
decoding, an explicit --tree winning over the table, and the writer keeping the other device types' tables."""

from __future__ import annotations

import json

import pytest
from tiny_serving import tiny_decoder

from medusa_llama.cli.serve import make_engine
from medusa_llama.decode.tree import builtin_tree
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import DecoderOptions, Pipeline
from medusa_llama.serve.config import ServeConfig
from medusa_llama.serve.engine import BatchedEngine, DecoderEngine
from medusa_llama.serve.trees import choose_tree, prefix_tree, write_device_table

TREE16 = builtin_tree("tree16")
TREE4 = prefix_tree(TREE16, 4)


def tiny_pipeline(tree: str | None = None) -> Pipeline:
    decoder = tiny_decoder("tree16")
    return Pipeline(decoder.backbone, decoder.heads, decoder.tree, decoder, DecoderOptions(device="cpu", tree=tree))


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "serve_trees.json"
    write_device_table(path, "cpu", {1: TREE16, 4: TREE4, 16: []}, produced_by="test")
    write_device_table(path, "cuda", {1: []}, produced_by="another test")
    return path


def test_prefix_tree_keeps_a_valid_tree_of_the_size_asked():
    for size in (1, 2, 4, 8, 16):
        small = prefix_tree(TREE16, size)
        assert len(small) == size - 1
        assert all(len(p) == 1 or p[:-1] in small for p in small)
    assert prefix_tree([[1], [0, 0], [0]], 3) == [[1], [0]]  # [0, 0] comes before its parent: skipped


@pytest.mark.parametrize(("b", "key"), [(1, 1), (2, 1), (4, 4), (8, 4), (16, 16), (64, 16)])
def test_the_largest_table_batch_size_at_most_b_is_chosen(table, b, key):
    choice = choose_tree(table, "cpu", b)
    assert choice.table_batch_size == key
    assert sorted(choice.choices) == sorted({1: TREE16, 4: TREE4, 16: []}[key])


def test_writing_one_device_keeps_the_others(table):
    data = json.loads(table.read_text())
    assert set(data) == {"cpu", "cuda"} and data["cuda"]["trees"] == {"1": []}
    assert data["cpu"]["produced_by"] == "test"
    assert choose_tree(table, "mps", 4) is None  # no table for this device type


def test_below_the_smallest_key_the_smallest_entry_serves(tmp_path):
    path = tmp_path / "t.json"
    write_device_table(path, "cpu", {4: TREE4})
    assert choose_tree(path, "cpu", 2).table_batch_size == 4


def test_a_bad_table_is_refused_naming_it(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"cpu": {"trees": {"4": [[0, 0]]}}}))
    with pytest.raises(MedusaError, match="t.json.*batch size '4'.*no parent"):
        choose_tree(path, "cpu", 4)


def test_the_server_serves_the_table_entry_for_its_batch_size(table):
    engine = make_engine(tiny_pipeline(), ServeConfig(batch_size=8, tree_table=str(table)))
    assert isinstance(engine, BatchedEngine) and engine.kind == "medusa" and engine.decoder.tree.size == 4
    engine = make_engine(tiny_pipeline(), ServeConfig(batch_size=2, tree_table=str(table)))
    assert engine.decoder.tree.size == 16


def test_an_empty_entry_falls_back_to_vanilla(table, caplog):
    with caplog.at_level("INFO", logger="medusa_llama.serve.trees"):
        engine = make_engine(tiny_pipeline(), ServeConfig(batch_size=16, tree_table=str(table)))
    assert isinstance(engine, BatchedEngine) and engine.kind == "vanilla" and engine.decoder.tree.size == 1
    assert "batch size 16: serving vanilla decoding (no tree)" in caplog.text  # the log says what was chosen


def test_batch_size_one_takes_the_table_too(table, tmp_path):
    path = tmp_path / "t.json"
    write_device_table(path, "cpu", {1: []})
    engine = make_engine(tiny_pipeline(), ServeConfig(tree_table=str(path)))
    assert isinstance(engine, DecoderEngine) and engine.kind == "vanilla"
    write_device_table(path, "cpu", {1: TREE4})
    engine = make_engine(tiny_pipeline(), ServeConfig(tree_table=str(path)))
    assert engine.kind == "medusa" and engine.decoder.tree.size == 4


def test_an_explicit_tree_wins_over_the_table(table):
    engine = make_engine(tiny_pipeline(tree="tree16"), ServeConfig(batch_size=16, tree_table=str(table)))
    assert engine.kind == "medusa" and engine.decoder.tree.size == 16


def test_without_a_table_the_pipeline_tree_serves():
    engine = make_engine(tiny_pipeline(), ServeConfig(batch_size=16))
    assert engine.kind == "medusa" and engine.decoder.tree.size == 16
