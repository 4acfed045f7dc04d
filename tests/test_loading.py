"""Model loading: the one-time conversion of the embedded model is safe to race; missing paths get a clear error."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medusa_llama import loading
from medusa_llama.errors import MedusaError

# A child process that converts on an empty cache with a slow stand-in for the GGUF dequantization, so that two
# children overlap for certain. It records each real conversion in runs.txt and prints the directory it got.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from medusa_llama import loading

    def slow_convert(gguf, out_dir):
        with open(Path(sys.argv[1]) / "runs.txt", "a") as f:
            f.write("run\\n")
        time.sleep(1.0)
        (out_dir / "config.json").write_text("{}")
        time.sleep(0.5)
        (out_dir / "model.safetensors").write_bytes(b"weights")

    loading._convert_gguf = slow_convert
    loading.embedded_gguf_path = lambda: Path("model.gguf")
    out = loading.converted_embedded()
    assert (out / "model.safetensors").read_bytes() == b"weights"
    print(out)
    """
)


def test_two_first_runs_at_once_convert_once_and_both_succeed(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "MEDUSA_LLAMA_CACHE": str(cache)}
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(cache / "SmolLM2-135M-Instruct")
    assert (tmp_path / "runs.txt").read_text() == "run\n"  # the second waited on the lock and found it done
    leftovers = [
        p.name for p in cache.iterdir() if p.name not in ("SmolLM2-135M-Instruct", ".SmolLM2-135M-Instruct.lock")
    ]
    assert leftovers == []


def test_failed_conversion_leaves_no_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: Path("model.gguf"))

    def interrupted(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loading.converted_embedded()
    assert [p.name for p in tmp_path.iterdir()] == [".SmolLM2-135M-Instruct.lock"]


def test_incomplete_cache_directory_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: Path("model.gguf"))
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")  # no weights: an old partial write

    def convert(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"w")

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    out = loading.converted_embedded()
    assert (out / "model.safetensors").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".SmolLM2-135M-Instruct.lock", "SmolLM2-135M-Instruct"]


@pytest.mark.parametrize("spec", ["/no/such/model", "./missing-model", "~/missing-model", "a/b/c", "models/"])
def test_missing_model_directory_is_named(spec):
    with pytest.raises(MedusaError, match="no such directory"):
        loading.resolve_model(spec)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(MedusaError, match="not a model directory"):
        loading.resolve_model(str(tmp_path))
