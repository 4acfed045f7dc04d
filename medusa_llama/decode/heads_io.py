"""Heads on disk: load (three formats, told apart by ``config.json``), save (ours), export (vLLM, FasterDecoding).

Formats read by ``load_heads`` (``--heads DIR`` everywhere):
- ours: ``config.json`` (``HeadsConfig`` + ``model_type: "medusa-llama-heads"``) + ``medusa_heads.safetensors``;
- FasterDecoding/Medusa (``medusa_num_heads`` in the config) and vLLM (``model_type: "medusa"``): see ``formats.py``.
Any of them may hold a draft vocabulary beside the weights (``draft_vocab.safetensors``, FR-Spec: ``heads.py``).

Nothing here unpickles. Weights are safetensors, configs JSON; a ``.pt`` file is read only with
``torch.load(weights_only=True)``, which accepts plain tensors and containers and refuses any other object
(a pickle whose ``__reduce__`` would run code is refused before anything runs).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from medusa_llama.decode import formats
from medusa_llama.decode.heads import CONFIG_NAME, DRAFT_VOCAB_NAME, WEIGHTS_NAME, HeadsConfig, MedusaHeads
from medusa_llama.errors import MedusaError

OUR_MODEL_TYPE = "medusa-llama-heads"


# -- reading -------------------------------------------------------------------------------------------------------
def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Named tensors from a safetensors file, or from a ``.pt``/``.bin`` file read with ``weights_only=True``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MedusaError(
            f"{path} is a pickle that holds more than tensors; it is not loaded, since unpickling it could run code "
            "(only torch.load(weights_only=True) is used): convert it to safetensors where it was made"
        ) from exc
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise MedusaError(f"corrupt heads checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedusaError(f"{path} holds no flat mapping of names to tensors (a state dict was expected)")
    return dict(state)


def _weights_file(directory: Path, fmt: str) -> Path | None:
    if fmt == formats.FASTER_DECODING:
        candidates = [directory / name for name in formats.FD_WEIGHTS]
    elif fmt == formats.VLLM:
        candidates = sorted(directory.glob("*.safetensors")) + [directory / "pytorch_model.bin"]
    else:
        candidates = [directory / WEIGHTS_NAME]
    return next((p for p in candidates if p.is_file()), None)


def _read_vllm_weights(directory: Path, first: Path) -> dict[str, torch.Tensor]:
    """vLLM reads every ``*.safetensors`` file of the directory (shards): so do we."""
    if first.suffix != ".safetensors":
        return read_weights(first)
    state = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(read_weights(shard))
    return state


def load_heads(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32, draft: bool = True
):
    """Load heads from a directory (or its weights file) in any of the three formats. Errors: one-line MedusaError.

    dtype: the dtype to cast to; None keeps the stored one. draft: also load the draft vocabulary beside them, if any
    (``heads.draft_vocab``).
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not path.exists() and path.suffix in (".pt", ".bin", ".safetensors"):
        raise MedusaError(f"heads file not found: {path}")
    config_file = directory / CONFIG_NAME
    raw = None
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MedusaError(f"corrupt heads config {config_file}: {exc}") from exc
    fmt = formats.detect_format(raw) if isinstance(raw, dict) else formats.OURS
    weights = path if path.is_file() else _weights_file(directory, fmt)
    if raw is None or weights is None:
        raise MedusaError(
            f"{path} holds no Medusa heads ({WEIGHTS_NAME} + {CONFIG_NAME} expected, or a FasterDecoding or vLLM "
            "Medusa directory)"
        )
    if not isinstance(raw, dict):
        raise MedusaError(f"corrupt heads config {config_file}: not a JSON object")
    state = _read_vllm_weights(directory, weights) if fmt == formats.VLLM else read_weights(weights)
    try:
        if fmt == formats.FASTER_DECODING:
            config, state = formats.from_faster_decoding(raw, state)
        elif fmt == formats.VLLM:
            config, state = formats.from_vllm(raw, state)
        else:
            config = HeadsConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    except (KeyError, TypeError, ValueError) as exc:
        raise MedusaError(f"corrupt heads config {config_file}: {exc}") from exc
    heads = MedusaHeads(config)
    try:
        missing, unexpected = heads.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        detail = " ".join(str(exc).split())
        raise MedusaError(f"heads checkpoint {weights} does not match its config: {detail}") from exc
    if missing or unexpected:
        raise MedusaError(
            f"heads checkpoint {weights} does not match its config: missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}"
        )
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    heads = heads.to(device=device, dtype=dtype or stored).eval()
    if draft and (directory / DRAFT_VOCAB_NAME).is_file():
        heads.draft_vocab = load_draft_vocab(directory / DRAFT_VOCAB_NAME, config.vocab_size)
    return heads


def load_draft_vocab(path: str | Path, vocab_size: int) -> torch.Tensor:
    """(N,) long token ids from a draft vocabulary file, checked: one 1-D integer tensor ``token_ids`` of unique
    ids below ``vocab_size``. Errors: one-line MedusaError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise MedusaError(f"corrupt draft vocabulary {path}: {str(exc).splitlines()[0]}") from exc
    ids = state.get("token_ids")
    if ids is None:
        raise MedusaError(f"draft vocabulary {path} holds no tensor 'token_ids' (found {sorted(state)[:3]})")
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        got = f"{str(ids.dtype).removeprefix('torch.')} {tuple(ids.shape)}"
        raise MedusaError(f"draft vocabulary {path}: 'token_ids' must be a non-empty 1-D integer tensor, got {got}")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise MedusaError(f"draft vocabulary {path}: token ids must lie in 0 .. {vocab_size - 1} (the heads' vocab)")
    if ids.unique().numel() != ids.numel():
        raise MedusaError(f"draft vocabulary {path}: token ids repeat")
    return ids


def save_draft_vocab(ids: torch.Tensor, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``draft_vocab.safetensors`` (``token_ids``, int64) into a heads directory, atomically; nothing else
    there is touched. An existing one is replaced only with ``overwrite``."""
    from safetensors.torch import save_file

    path = Path(directory) / DRAFT_VOCAB_NAME
    if path.exists() and not overwrite:
        raise MedusaError(f"{path} exists: pass --overwrite to replace it (nothing was written)")
    tmp = path.with_name(DRAFT_VOCAB_NAME + ".tmp")
    save_file({"token_ids": ids.detach().to("cpu", torch.long).contiguous()}, tmp, metadata={"format": "pt"})
    tmp.replace(path)
    return path


def check_compatible(config: HeadsConfig, hidden_size: int, vocab_size: int, base_model: str | None = None) -> None:
    """Raise ``MedusaError`` if heads of this config were not made for this backbone."""
    c = config
    if c.hidden_size != hidden_size or c.vocab_size != vocab_size:
        raise MedusaError(
            f"heads were trained for hidden size {c.hidden_size} / vocab {c.vocab_size} ({c.base_model or '?'}), "
            f"but the model has hidden size {hidden_size} / vocab {vocab_size}"
        )
    if base_model and c.base_model and c.base_model != base_model:
        raise MedusaError(f"heads were trained on {c.base_model!r}, not on {base_model!r}")


# -- writing -------------------------------------------------------------------------------------------------------
def save_heads(heads: MedusaHeads, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``medusa_heads.safetensors`` + ``config.json`` into ``directory`` (atomically per file)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = heads.trainable_state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_NAME)
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps({"model_type": OUR_MODEL_TYPE, **asdict(heads.config)}, indent=2))
    tmp.replace(directory / CONFIG_NAME)


def check_out_dir(out: str | Path) -> Path:
    """``--out`` must not exist or be an empty directory: exports never overwrite or delete anything."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedusaError(f"--out {out} exists and is not an empty directory: give a new one (nothing was written)")
    return out


def export_heads(heads: MedusaHeads, out: str | Path, fmt: str, base_lm_weight: torch.Tensor | None = None):
    """Write ``heads`` in ``fmt`` (``vllm`` or ``medusa``, the FasterDecoding format) into the new directory ``out``.

    base_lm_weight: (V, D) the base model's LM head weight, copied into every head when the heads share it.
    Returns the written files. The directory appears whole or not at all (written beside it, then renamed).
    """
    from safetensors.torch import save_file

    out = check_out_dir(out)
    raw, state = (formats.to_vllm if fmt == formats.VLLM else formats.to_faster_decoding)(heads, base_lm_weight)
    weights_name = formats.VLLM_WEIGHTS if fmt == formats.VLLM else formats.FD_WEIGHTS[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, tmp / weights_name, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n")
        os.replace(tmp, out)  # POSIX: replaces only a missing or empty directory
    except OSError as exc:
        raise MedusaError(f"cannot write {out}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # our own temporary directory only
    return [out / weights_name, out / CONFIG_NAME]


def base_lm_head_weight(model: str | None, heads: MedusaHeads) -> torch.Tensor:
    """(V, D) the LM head weight of the base model ``model`` (an HF id, a directory or the embedded model)."""
    from medusa_llama.loading import load_model, model_name

    hf = load_model(model)
    lm_head = hf.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise MedusaError(f"the LM head of {model!r} has a bias, which neither export format can hold")
    vocab, hidden = lm_head.weight.shape
    check_compatible(heads.config, hidden, vocab, model_name(model))
    return lm_head.weight.detach()


def export_heads_dir(heads: str | Path, fmt: str, out: str | Path, model: str | None = None) -> list[Path]:
    """The ``export`` command: load heads (any format), write them in ``fmt`` to the new directory ``out``.

    The base model (``model``, default: the one the heads name) is loaded only for heads that share its LM head.
    """
    out = check_out_dir(out)  # before any work
    loaded = load_heads(heads, dtype=None)
    formats.check_exportable(loaded.config, fmt)
    weight = None
    if loaded.lm_heads is None:
        weight = base_lm_head_weight(model or loaded.config.base_model or None, loaded)
    return export_heads(loaded, out, fmt, weight)
