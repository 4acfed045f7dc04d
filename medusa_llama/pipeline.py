"""Assemble what a command needs from user-facing options: backbone (+ merged adapter), heads, tree."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from medusa_llama.decode.backbone import Backbone, make_backbone
from medusa_llama.decode.heads import WEIGHTS_NAME, MedusaHeads
from medusa_llama.decode.tree import DEFAULT_TREE, Tree, build_tree, load_choices
from medusa_llama.errors import MedusaError
from medusa_llama.loading import is_embedded, load_model, load_tokenizer, model_name

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHIPPED_HEADS = ASSETS / "heads" / "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_heads_dir(model: str | None = None) -> Path | None:
    """The project's shipped heads for the embedded model, if installed; None otherwise."""
    if is_embedded(model) and (SHIPPED_HEADS / WEIGHTS_NAME).is_file():
        return SHIPPED_HEADS
    return None


def adapter_dir_of(heads_dir: Path | None) -> Path | None:
    """A LoRA adapter saved beside heads (``adapter/`` inside the heads directory, or the directory itself)."""
    if heads_dir is None:
        return None
    heads_dir = heads_dir if heads_dir.is_dir() else heads_dir.parent
    for cand in (heads_dir / "adapter", heads_dir):
        if (cand / "adapter_config.json").is_file():
            return cand
    return None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedusaError(f"--device {device}: no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_pipeline_backbone(
    model: str | None,
    device: str = "auto",
    dtype: str = "auto",
    max_seq_len: int = 2048,
    backend: str = "auto",
    adapter: str | Path | None = None,
) -> Backbone:
    """Load the backbone; a LoRA adapter (Medusa-2) is merged into it first, so decoding runs at full speed."""
    device = resolve_device(device)
    tokenizer = load_tokenizer(model)
    hf = load_model(model, dtype=resolve_dtype(dtype, device), device=device)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise MedusaError(f"--adapter_dir {adapter} holds no LoRA adapter (adapter_config.json missing)")
        log.info("merging LoRA adapter %s", adapter)
        hf = PeftModel.from_pretrained(hf, str(adapter)).merge_and_unload().eval()
    return make_backbone(hf, tokenizer, model_name(model), max_seq_len, backend)


def load_heads(heads: str | Path | None, backbone: Backbone) -> MedusaHeads:
    """Load heads and check them against the backbone (hidden size, vocab, base model)."""
    loaded = MedusaHeads.load(heads, device=backbone.device, dtype=backbone.dtype)
    loaded.check_compatible(backbone.hidden_size, backbone.vocab_size, backbone.name)
    return loaded


def default_tree_spec(heads_dir: Path | None, device: str) -> str:
    """The tree to use when ``--tree`` is not given: the one ``medusa-llama tree`` chose for this kind of device and
    saved beside the heads (``tree_cpu.json`` / ``tree_cuda.json``), else the built-in default."""
    if heads_dir is not None:
        saved = (heads_dir if heads_dir.is_dir() else heads_dir.parent) / f"tree_{torch.device(device).type}.json"
        if saved.is_file():
            return str(saved)
    return DEFAULT_TREE


def load_tree(spec: str | None, num_heads: int) -> Tree:
    choices = load_choices(spec or DEFAULT_TREE)
    depth = max(len(p) for p in choices)
    if depth > num_heads:  # built-in trees may be deeper than small head sets: cut them to fit
        if spec is None or Path(spec).is_file():
            raise MedusaError(f"--tree {spec} is {depth} deep but the heads predict only {num_heads} tokens")
        choices = [p for p in choices if len(p) <= num_heads]
    return build_tree(choices, num_heads)
