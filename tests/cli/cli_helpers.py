"""Fixtures of the CLI tests, a plugin of theirs (``pytest_plugins``): a conftest.py here would shadow
``tests/conftest.py``, whose helpers other tests import as ``conftest``.

A tiny random Llama saved as a local model directory with a word-level tokenizer, 3-head heads, and ``cli``, which
runs ``medusa_llama.cli.run`` in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import random_heads, tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """``.../tiny``: config, weights and a tokenizer of the words ``w1`` .. ``w95``; no EOS, so a run uses its whole
    budget. Named "tiny" like the base model that ``random_heads`` records, so the heads' base-model check passes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_llama(eos_token_id=None, bos_token_id=None).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 96)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def heads3(tmp_path_factory) -> Path:
    """Three heads (``train_kd.py --offsets 1 2 3``, as documented): shallower than the default tree64."""
    path = tmp_path_factory.mktemp("heads3")
    random_heads(num_heads=3).save(path)
    return path


@pytest.fixture
def cli(capsys, one_thread):
    """``cli(*argv)`` -> (exit code, stdout, stderr) of ``medusa_llama.cli.run``, in this process."""
    from medusa_llama.cli import run

    def call(*argv):
        code = run([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call
