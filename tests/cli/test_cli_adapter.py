"""``--adapter``: a shipped adapter by name (``medusa2``) or a directory; none by default; an unknown name is one
error line before any model loads; ``--help`` says that an adapter changes the model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medusa_llama.cli import run
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import SHIPPED_ADAPTERS, SHIPPED_HEADS, adapter_dir_of, resolve_adapter

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the seed's scripts

pytest_plugins = ("cli_helpers",)  # its fixtures: a conftest.py here would shadow tests/conftest.py

DECODING = [["generate", "hi"], ["bench"], ["heads-accuracy"], ["tree"], ["serve"]]


def seed_parser(name: str):
    import decode_tree
    import evaluate

    return {"decode_tree.py": decode_tree.parser, "evaluate.py": evaluate.build_parser}[name]()


def run_seed(name: str, *argv) -> int:
    return run([str(a) for a in argv], parser=seed_parser(name))


@pytest.fixture
def loaded_adapter(monkeypatch):
    """Stop a command where the model would load; the list gets the adapter it would have merged."""
    seen = []

    def stop(*args, adapter=None, **kwargs):
        seen.append(adapter)
        raise MedusaError("stopped before the model loads")

    monkeypatch.setattr("medusa_llama.pipeline.load_pipeline_backbone", stop)
    return seen


def test_the_shipped_name_resolves_to_its_folder_and_a_path_still_works(tmp_path):
    shipped = SHIPPED_ADAPTERS["medusa2"]
    assert resolve_adapter("medusa2") == shipped
    assert (shipped / "adapter_config.json").is_file() and (shipped / "adapter_model.safetensors").is_file()
    assert resolve_adapter(str(tmp_path)) == tmp_path
    # the default merges nothing: the shipped heads have no adapter beside them, and the adapter is not one of theirs
    assert resolve_adapter(None, SHIPPED_HEADS) is None
    assert adapter_dir_of(SHIPPED_HEADS) is None
    assert SHIPPED_HEADS not in shipped.parents
    with pytest.raises(MedusaError, match="neither a shipped adapter"):
        resolve_adapter("medusa3", SHIPPED_HEADS)
    with pytest.raises(MedusaError, match="made for the embedded"):
        resolve_adapter("medusa2", SHIPPED_HEADS, model="some/other-model")


@pytest.mark.parametrize("argv", [*DECODING, ["generate", "hi", "--vanilla"]])
def test_the_default_merges_no_adapter(argv, cli, loaded_adapter):
    code, _, err = cli(*argv)
    assert code == 2 and "stopped before the model loads" in err, err
    assert loaded_adapter == [None]


@pytest.mark.parametrize("argv", [*DECODING, ["generate", "hi", "--vanilla"]])
def test_adapter_medusa2_merges_the_shipped_adapter(argv, cli, loaded_adapter):
    code, _, err = cli(*argv, "--adapter", "medusa2")
    assert code == 2 and "stopped before the model loads" in err, err
    assert loaded_adapter == [SHIPPED_ADAPTERS["medusa2"]]


@pytest.mark.parametrize("name, flag", [("decode_tree.py", "--adapter_dir"), ("evaluate.py", "--adapter")])
def test_the_seed_scripts_take_the_name_too(name, flag, capsys, one_thread, loaded_adapter):
    assert run_seed(name, flag, "medusa2") == 2
    assert run_seed(name) == 2
    assert loaded_adapter == [SHIPPED_ADAPTERS["medusa2"], None]


def assert_one_error_line(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0], err


UNKNOWN = "error: --adapter medusa3: neither a shipped adapter (medusa2) nor an existing directory"


@pytest.mark.parametrize("argv", DECODING)
def test_an_unknown_adapter_name_is_one_error_line(argv, cli, loaded_adapter):
    code, _, err = cli(*argv, "--adapter", "medusa3")
    assert_one_error_line(code, err, UNKNOWN)
    assert loaded_adapter == []  # refused before the model loads


@pytest.mark.parametrize("name, flag", [("decode_tree.py", "--adapter_dir"), ("evaluate.py", "--adapter")])
def test_an_unknown_adapter_name_in_the_seed_scripts(name, flag, capsys, one_thread, loaded_adapter):
    code = run_seed(name, flag, "medusa3")
    assert_one_error_line(code, capsys.readouterr().err, UNKNOWN)


def test_the_shipped_adapter_is_refused_for_another_model(cli, tiny_model_dir, loaded_adapter):
    code, _, err = cli("generate", "hi", "--model", tiny_model_dir, "--adapter", "medusa2")
    assert_one_error_line(code, err, "--adapter medusa2 is made for the embedded SmolLM2-135M-Instruct")
    assert loaded_adapter == []


@pytest.mark.parametrize("argv", [[c[0]] for c in DECODING] + [["decode_tree.py"], ["evaluate.py"]])
def test_help_says_an_adapter_changes_the_model(argv, cli, capsys):
    if argv[0].endswith(".py"):
        assert run_seed(argv[0], "--help") == 0
        out = capsys.readouterr().out
    else:
        code, out, _ = cli(argv[0], "--help")
        assert code == 0
    text = " ".join(out.split())
    for fragment in (
        "ADAPTER A LoRA adapter merged into the model: a shipped one by name (medusa2",
        "It CHANGES THE MODEL: decoding is then lossless to the adapted model, not to the original",
        "98.6%",
        "Default: none (the original model, exactly)",
    ):
        assert fragment in text, (fragment, text)
