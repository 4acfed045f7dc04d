"""One assembly path: heads and tree read and checked before the model loads, the tree fitted to the heads the same
way for every command; 3-head heads (``--offsets 1 2 3``) work with the default tree everywhere."""

from __future__ import annotations

import json

import pytest

from medusa_llama.decode.decoder import MedusaDecoder, VanillaDecoder
from medusa_llama.decode.tree import DEFAULT_TREE, builtin_tree
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import DecoderOptions, fit_tree, load_pipeline, load_tree

TRIMMED = [p for p in builtin_tree(DEFAULT_TREE) if len(p) <= 3]
"""The default tree cut to 3 heads."""

pytest_plugins = ("cli_helpers",)  # its fixtures: a conftest.py here would shadow tests/conftest.py


def options(model, heads=None, **kw) -> DecoderOptions:
    return DecoderOptions(model=str(model), heads=heads and str(heads), device="cpu", max_seq_len=128, **kw)


def test_the_default_tree_is_fitted_to_three_heads(tiny_model_dir, heads3, one_thread):
    pipe = load_pipeline(options(tiny_model_dir, heads3))
    assert isinstance(pipe.decoder, MedusaDecoder) and pipe.heads.num_heads == 3
    assert sorted(pipe.tree.paths) == sorted(map(tuple, TRIMMED)) and pipe.tree_spec == DEFAULT_TREE
    vanilla = load_pipeline(options(tiny_model_dir, heads3, vanilla=True))
    assert isinstance(vanilla.decoder, VanillaDecoder) and vanilla.heads is None and vanilla.tree is None


def test_fit_tree_cuts_built_in_trees_and_refuses_deeper_files(tmp_path):
    assert fit_tree(builtin_tree("tree64"), 3, "tree64") == TRIMMED
    assert load_tree("chain", 2).max_depth == 2
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps({"medusa_choices": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]}))
    with pytest.raises(MedusaError, match="4 deep but the heads predict only 3"):
        load_tree(str(deep), 3)


def test_heads_and_tree_are_checked_before_the_model_loads(tmp_path, heads3, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the files were checked")

    monkeypatch.setattr("medusa_llama.pipeline.load_pipeline_backbone", refuse)
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(MedusaError, match="4 deep"):
        load_pipeline(options("tiny-model-id", heads3, tree=str(deep)))
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "config.json").write_text("{")
    with pytest.raises(MedusaError):
        load_pipeline(options("tiny-model-id", tmp_path / "h"))
    with pytest.raises(MedusaError, match="no Medusa heads given"):
        load_pipeline(options("tiny-model-id"), need_heads=True)


def test_generate_with_three_heads_and_the_default_tree(tiny_model_dir, heads3, cli):
    common = ["w1 w2 w3", "--model", tiny_model_dir, "--max-new-tokens", 12, "--max-seq-len", 128, "--device", "cpu"]
    code, medusa_out, err = cli("generate", *common, "--heads", heads3)
    assert code == 0, err
    assert f"[medusa, tree {len(TRIMMED) + 1}] 12 new tokens" in err
    code, vanilla_out, err = cli("generate", *common, "--heads", heads3, "--vanilla")
    assert code == 0 and "[vanilla] 12 new tokens" in err
    assert medusa_out == vanilla_out  # greedy Medusa is lossless (fp32)


def test_bench_with_three_heads_and_the_default_tree(tmp_path, tiny_model_dir, heads3, cli):
    """Into an existing directory (holding other files): the report's four files, nothing else, nothing lost."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3"}\n{"prompt": "w4 w5"}\n')
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    code, out, err = cli(
        "bench", "--model", tiny_model_dir, "--heads", heads3, "--prompts", prompts, "--max-new-tokens", 8,
        "--max-seq-len", 128, "--no-warmup", "--device", "cpu", "--out", out_dir / "report.json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["tree"] == DEFAULT_TREE and report["tree_depth"] == 3 and report["tree_size"] == len(TRIMMED) + 1
    assert report["identical"] and len(report["prompts"]) == 2
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["notes.txt", "report.json", "report.md", "report_acceptance.png", "report_tokens_per_s.png"]


def test_heads_accuracy_then_tree_with_three_heads(tmp_path, tiny_model_dir, heads3, cli):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3"}\n')
    common = ["--model", tiny_model_dir, "--heads", heads3, "--prompts", prompts, "--max-seq-len", 128]
    code, _, err = cli("heads-accuracy", *common, "--max-new-tokens", 8, "--out", tmp_path / "acc.json")
    assert code == 0, err
    assert len(json.loads((tmp_path / "acc.json").read_text())["accuracy"]) == 3
    code, _, err = cli(
        "tree", *common, "--accuracy", tmp_path / "acc.json", "--sizes", "1,4", "--probe-prompts", 1,
        "--probe-tokens", 4, "--out", tmp_path / "tree.json",
    )  # fmt: skip
    assert code == 0, err
    assert load_tree(str(tmp_path / "tree.json"), 3).size <= 4


@pytest.fixture(scope="session")
def heads3_draft(tmp_path_factory):
    """``heads3`` with a stored draft vocabulary of 40 tokens (most frequent first: 95, 94, ..., 56)."""
    import torch
    from conftest import random_heads

    from medusa_llama.decode.heads_io import save_draft_vocab

    path = tmp_path_factory.mktemp("heads3_draft")
    random_heads(num_heads=3).save(path)
    save_draft_vocab(torch.arange(95, 55, -1), path)
    return path


@pytest.mark.parametrize(("flag", "size"), [((), 40), (("--draft-vocab", 12), 12), (("--draft-vocab", 0), 0)])
def test_heads_accuracy_and_tree_record_the_draft_vocabulary(tmp_path, tiny_model_dir, heads3_draft, cli, flag, size):
    """Scored over the draft vocabulary decoding uses: the heads' stored one by default, its first N, or none."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3"}\n')
    common = ["--model", tiny_model_dir, "--heads", heads3_draft, "--prompts", prompts, "--max-seq-len", 128, *flag]
    code, out, err = cli("heads-accuracy", *common, "--max-new-tokens", 8, "--out", tmp_path / "acc.json")
    assert code == 0, err
    assert json.loads((tmp_path / "acc.json").read_text())["draft_vocab"] == size
    assert (f"a draft vocabulary of {size} tokens" if size else "the full vocabulary") in out
    code, _, err = cli(
        "tree", *common, "--accuracy-prompts", 1, "--accuracy-tokens", 8, "--sizes", "1,4", "--probe-prompts", 1,
        "--probe-tokens", 4, "--out", tmp_path / "tree.json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "tree.json").read_text())["draft_vocab"] == size


def test_tree_warns_when_the_accuracy_was_scored_over_another_draft(
    tmp_path, tiny_model_dir, heads3_draft, cli, caplog
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3"}\n')
    common = ["--model", tiny_model_dir, "--heads", heads3_draft, "--prompts", prompts, "--max-seq-len", 128]
    acc = tmp_path / "a.json"
    code, _, err = cli("heads-accuracy", *common, "--draft-vocab", 0, "--max-new-tokens", 8, "--out", acc)
    assert code == 0, err
    code, _, err = cli(
        "tree", *common, "--accuracy", acc, "--sizes", "1,4", "--probe-prompts", 1,
        "--probe-tokens", 4, "--out", tmp_path / "tree.json",
    )  # fmt: skip
    assert code == 0, err
    assert "scored with a draft vocabulary of 0 tokens (0: none) but decoding uses 40" in caplog.text
