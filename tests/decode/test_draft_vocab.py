"""Draft vocabulary (FR-Spec): proposals restricted to N tokens, verification on the full vocabulary.

Greedy decoding with a draft vocabulary equals vanilla greedy decoding (static tree, dynamic tree, batched); a draft
vocabulary holding every token proposes exactly what the full vocabulary does; proposals never leave the subset;
the file round-trips and malformed files are refused in one line; ``draft-vocab`` counts loss positions.
"""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, FakeTokenizer, random_heads, tiny_llama

from medusa_llama.cli import run
from medusa_llama.decode import dynamic_tree, proposal
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.dynamic_tree import DynamicTree
from medusa_llama.decode.heads import DRAFT_VOCAB_NAME, DraftVocab
from medusa_llama.decode.heads_io import load_heads, save_draft_vocab
from medusa_llama.decode.tree import build_tree, builtin_tree
from medusa_llama.errors import MedusaError
from medusa_llama.train.blocks import write_blocks

pytestmark = pytest.mark.usefixtures("one_thread")
V = TINY["vocab_size"]
GREEDY = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
PROMPTS = ([4, 8, 15, 16, 23, 42], list(range(3, 30)))


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, "fast")


def subset(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:n]


def heads_with(kind: str, ids: torch.Tensor | None, **cfg):
    heads = random_heads(kind, **cfg)
    heads.draft_vocab = ids
    return heads


@pytest.mark.parametrize("tree", [builtin_tree("tree16"), DynamicTree(24, topk=4)], ids=["static", "dynamic"])
@pytest.mark.parametrize("kind,lm_head", [("sequential", "shared"), ("medusa", "shared"), ("sequential", "own")])
def test_greedy_with_a_draft_vocab_equals_vanilla(backbone, kind, lm_head, tree):
    dec = MedusaDecoder(backbone, heads_with(kind, subset(24), lm_head=lm_head), tree)
    assert dec.draft is not None and dec.draft.size == 24
    vanilla = VanillaDecoder(backbone)
    for prompt in PROMPTS:
        assert dec.generate(prompt, GREEDY).tokens == vanilla.generate(prompt, GREEDY).tokens


@pytest.mark.parametrize("kind", ["sequential", "medusa"])
def test_batched_greedy_with_a_draft_vocab_equals_vanilla(backbone, kind):
    dec = BatchedDecoder(backbone, 2, heads_with(kind, subset(30)), builtin_tree("tree16"), draft_vocab=20)
    assert dec.draft.size == 20
    results = dec.generate_many(list(PROMPTS), GREEDY)
    vanilla = VanillaDecoder(backbone)
    assert [r.tokens for r in results] == [vanilla.generate(p, GREEDY).tokens for p in PROMPTS]


@pytest.mark.parametrize("kind,lm_head", [("sequential", "shared"), ("medusa", "shared"), ("medusa", "own")])
def test_a_draft_vocab_of_every_token_proposes_exactly_the_full_vocab(backbone, kind, lm_head):
    heads = random_heads(kind, lm_head=lm_head)
    ids = subset(V, seed=5)  # a permutation of the whole vocabulary; with its embedding rows or without
    drafts = [DraftVocab.build(heads, backbone.lm_head, ids, embed) for embed in (None, backbone.embed)]
    assert drafts[0].embeddings is None and (drafts[1].embeddings is None) == (kind == "medusa")
    tree, spec = build_tree(builtin_tree("tree32"), heads.num_heads), DynamicTree(32, topk=4)
    g = torch.Generator().manual_seed(2)
    hidden, root = torch.randn(3, TINY["hidden_size"], generator=g), torch.randint(0, V, (3,), generator=g)
    args = (backbone.embed, backbone.lm_head)
    for draft in drafts:
        for b in range(3):
            full = proposal.propose(heads, hidden[b], root[b], tree, *args)
            assert torch.equal(proposal.propose(heads, hidden[b], root[b], tree, *args, draft), full)
            tokens, step_tree = dynamic_tree.propose(heads, hidden[b], root[b], spec, *args)
            tokens_d, step_tree_d = dynamic_tree.propose(heads, hidden[b], root[b], spec, *args, draft)
            assert torch.equal(tokens_d, tokens) and torch.equal(step_tree_d.parent, step_tree.parent)
        assert torch.equal(  # a batch of rows
            proposal.propose(heads, hidden, root, tree, *args, draft),
            proposal.propose(heads, hidden, root, tree, *args),
        )


def test_proposals_stay_inside_the_draft_vocab(backbone):
    ids = subset(12, seed=7)
    for kind in ("sequential", "medusa"):
        heads = random_heads(kind)
        draft = DraftVocab.build(heads, backbone.lm_head, ids)
        tree = build_tree(builtin_tree("tree64"), heads.num_heads)
        for seed in range(5):
            hidden = torch.randn(TINY["hidden_size"], generator=torch.Generator().manual_seed(seed))
            args = (hidden, torch.tensor(3), tree, backbone.embed, backbone.lm_head, draft)
            assert torch.isin(proposal.propose(heads, *args)[1:], ids).all()
            tokens, _ = dynamic_tree.propose(heads, hidden, torch.tensor(3), DynamicTree(40), *args[3:])
            assert torch.isin(tokens[1:], ids).all()


def test_draft_vocab_option_semantics(backbone):
    stored = subset(30)
    tree = builtin_tree("tree16")
    assert MedusaDecoder(backbone, heads_with("sequential", stored), tree).draft.size == 30  # default: stored
    assert MedusaDecoder(backbone, heads_with("sequential", stored), tree, draft_vocab=0).draft is None
    small = MedusaDecoder(backbone, heads_with("sequential", stored), tree, draft_vocab=10).draft
    assert torch.equal(small.ids, stored[:10])  # the first N: the most frequent
    assert MedusaDecoder(backbone, heads_with("sequential", None), tree).draft is None  # old heads: as before
    with pytest.raises(MedusaError, match="no draft_vocab"):
        MedusaDecoder(backbone, heads_with("sequential", None), tree, draft_vocab=8)
    with pytest.raises(MedusaError, match="1 .. 30"):
        MedusaDecoder(backbone, heads_with("sequential", stored), tree, draft_vocab=31)
    with pytest.raises(MedusaError, match="smaller than the tree's top"):
        MedusaDecoder(backbone, heads_with("sequential", stored), DynamicTree(16, topk=8), draft_vocab=4)
    assert MedusaDecoder(backbone, heads_with("sequential", stored), []).draft is None  # root alone: no heads run


def test_file_round_trip_and_malformed_files(tmp_path):
    from safetensors.torch import save_file

    heads = random_heads("sequential")
    heads.save(tmp_path)
    assert load_heads(tmp_path).draft_vocab is None  # heads without the file load as before
    ids = subset(40)
    save_draft_vocab(ids, tmp_path)
    assert torch.equal(load_heads(tmp_path).draft_vocab, ids)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == V  # config untouched
    with pytest.raises(MedusaError, match="exists"):
        save_draft_vocab(ids, tmp_path)
    bad = {
        r"1-D integer tensor, got int64 \(8, 5\)": {"token_ids": ids.view(8, 5)},
        "1-D integer tensor, got float32": {"token_ids": ids.float()},
        "repeat": {"token_ids": torch.tensor([1, 2, 2])},
        "must lie in": {"token_ids": torch.tensor([1, V])},
        "no tensor": {"ids": ids},
    }
    for message, state in bad.items():
        save_file(state, tmp_path / DRAFT_VOCAB_NAME)
        with pytest.raises(MedusaError, match=message) as err:
            load_heads(tmp_path)
        assert "\n" not in str(err.value)
    (tmp_path / DRAFT_VOCAB_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(MedusaError, match="corrupt draft vocabulary"):
        load_heads(tmp_path)


def test_draft_vocab_command_counts_loss_positions(tmp_path, capsys):
    heads_dir, data = tmp_path / "heads", tmp_path / "data"
    random_heads("sequential").save(heads_dir)
    weights = (heads_dir / "medusa_heads.safetensors").read_bytes()
    tokens = np.array([[5, 5, 5, 7, 7, 9, 1, 1], [5, 7, 7, 9, 9, 9, 2, 2]])  # (2, 8)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]])  # 1 and 2 only outside the loss
    write_blocks(data, "train", tokens, mask)
    write_blocks(data, "val", tokens[:0], mask[:0])
    meta = {"format": 1, "block_size": 8, "vocab_size": V, "splits": {"train": {"blocks": 2}, "val": {"blocks": 0}}}
    (data / "meta.json").write_text(json.dumps(meta))
    argv = ["draft-vocab", "--data", str(data), "--heads", str(heads_dir), "--size", "2"]
    assert run(argv) == 0
    # loss counts: 5 x3, 7 x3, 9 x4 -> 9 first, then 5 and 7 tie (lower id first); 7 of 10 tokens covered
    assert torch.equal(load_heads(heads_dir).draft_vocab, torch.tensor([9, 5]))
    assert "70.00%" in capsys.readouterr().out
    assert (heads_dir / "medusa_heads.safetensors").read_bytes() == weights  # nothing else touched
    assert run(argv) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert run([*argv[:-1], "50", "--overwrite"]) == 0  # capped at the 3 tokens that occur
    assert torch.equal(load_heads(heads_dir).draft_vocab, torch.tensor([9, 5, 7]))
    assert "100.00%" in capsys.readouterr().out
