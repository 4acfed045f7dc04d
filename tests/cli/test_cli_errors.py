"""Every bad input ends in one ``error:`` line on stderr and exit code 2, no traceback; ``--debug`` shows it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medusa_llama.decode.heads import WEIGHTS_NAME, HeadsConfig, MedusaHeads

REPO = Path(__file__).resolve().parents[2]

pytest_plugins = ("cli_helpers",)  # its fixtures: a conftest.py here would shadow tests/conftest.py


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model (exit code 1: an unexpected error)."""

    def refuse(*args, **kwargs):
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr("medusa_llama.pipeline.load_pipeline_backbone", refuse)


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    """Exit code 2, one line starting with "error:" holding each fragment, no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["generate", "hi", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["generate", "hi", "--max-seq-len", "-100"], "--max-seq-len must be >= 16, got -100"),
        (["bench", "--max-seq-len", "-100"], "--max-seq-len must be >= 16"),
        (["generate", "hi", "--temperature", "nan"], "--temperature must be a finite number, got 'nan'"),
        (["generate", "hi", "--temperature", "inf"], "--temperature must be a finite number, got 'inf'"),
        (["bench", "--temperature=-inf"], "--temperature must be a finite number"),
        (["generate", "hi", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["generate", "hi", "--max-seq-len", "x"], "--max-seq-len must be an integer, got 'x'"),
        (["generate", "hi", "--backend", "tpu"], "invalid choice: 'tpu'"),
        (["generate"], "the following arguments are required: prompt"),
        (["bench", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--num-heads", "3", "--offsets", "1", "2", "3"], "not allowed with argument"),
        (["bench", "--heads", "/nonexistent/heads"], "--heads /nonexistent/heads: no such file or directory"),
    ],
)
def test_bad_flags(argv, fragment, cli, no_model_load):
    code, _, err = cli(*argv)
    assert_one_error_line(code, err, fragment)


@pytest.mark.parametrize("model", ["/nonexistent/model-dir", "./missing-model"])
def test_a_missing_model_directory_is_named(model, cli, caplog):
    code, _, err = cli("generate", "hi", "--model", model)
    assert_one_error_line(code, err, f"--model {model}: no such directory")
    assert "no trained Medusa heads" not in err + caplog.text  # the model is the problem: no misleading note first


def test_invalid_utf8_prompt_in_argv(tmp_path):
    """Bytes the command line cannot decode reach Python as surrogates (surrogateescape): refused, not crashed on."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "medusa_llama", "generate", b"caf\xff", "--model", "/nonexistent/model-dir"],
        capture_output=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    err = proc.stderr.decode("utf-8", "replace")
    assert_one_error_line(proc.returncode, err, "the prompt is not valid UTF-8 (byte 0xff at character 3)")


def test_heads_for_another_hidden_size(tmp_path, cli, tiny_model_dir):
    MedusaHeads(HeadsConfig(num_heads=2, hidden_size=32, vocab_size=96, base_model="tiny")).save(tmp_path)
    code, _, err = cli("generate", "w1 w2", "--model", tiny_model_dir, "--heads", tmp_path, "--max-new-tokens", 4)
    assert_one_error_line(code, err, "hidden size 32", "hidden size 64")


class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_heads_are_refused_without_unpickling(tmp_path, cli, heads3, no_model_load):
    import shutil

    import torch

    shutil.copytree(heads3, tmp_path / "heads")
    (tmp_path / "heads" / WEIGHTS_NAME).unlink()
    marker = tmp_path / "ran"
    torch.save({"blocks.0.0.linear.weight": RunsCode(marker)}, tmp_path / "heads" / "heads.pt")
    code, _, err = cli("generate", "hi", "--heads", tmp_path / "heads" / "heads.pt")
    assert_one_error_line(code, err, "heads.pt")
    assert not marker.exists(), "the pickle was executed"


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_bench_out_is_checked_before_anything_runs(where, tmp_path, cli, heads3, no_model_load):
    (tmp_path / "file.json").write_text("{}")
    out = tmp_path if where == "directory" else tmp_path / "file.json" / "report.json"
    code, _, err = cli("bench", "--heads", heads3, "--out", out)
    assert_one_error_line(code, err, "--out", "is a directory" if where == "directory" else "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]  # nothing written


@pytest.mark.parametrize("command", ["heads-accuracy", "tree"])
def test_other_outputs_are_checked_before_anything_runs(command, tmp_path, cli, heads3, no_model_load):
    code, _, err = cli(command, "--heads", heads3, "--out", tmp_path)
    assert_one_error_line(code, err, "--out", "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_bench_out_in_an_unwritable_directory(tmp_path, cli, heads3, no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = cli("bench", "--heads", heads3, "--out", locked / "report.json")
    assert_one_error_line(code, err, "not writable")


@pytest.mark.parametrize("where", ["onto a file", "under a file"])
def test_prepare_out_is_checked_before_anything_runs(where, tmp_path, cli):
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" if where == "onto a file" else tmp_path / "file" / "data"
    code, _, err = cli("prepare", "--out", out)
    assert_one_error_line(code, err, "--out", "is a file" if where == "onto a file" else "lies under")
    assert (tmp_path / "file").read_text() == "mine" and sorted(tmp_path.iterdir()) == [tmp_path / "file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_prepare_out_in_an_unwritable_directory(tmp_path, cli):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = cli("prepare", "--out", locked / "data")
    assert_one_error_line(code, err, "no permission to write")


def test_debug_shows_the_traceback(cli):
    for argv in (["--debug", "generate", "hi", "--device", "tpu"], ["generate", "hi", "--device", "tpu", "--debug"]):
        with pytest.raises(ValueError, match="--device"):
            cli(*argv)


def test_an_unexpected_failure_is_one_line_too(monkeypatch, cli):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("medusa_llama.cli.generate.load_pipeline", boom)
    code, _, err = cli("generate", "hi")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: RuntimeError: boom") and "--debug" in lines[0]
