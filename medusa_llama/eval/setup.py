"""What every evaluation command shares: which model, heads, device and dtype, and loading them.

``bench``, ``heads-accuracy`` and ``tree`` take the same model options; they are declared once here.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa_llama.decode.backbone import BACKENDS
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import (
    DTYPES,
    adapter_dir_of,
    default_heads_dir,
    load_heads,
    load_pipeline_backbone,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)


@dataclass
class ModelOptions:
    model: str | None = None
    """--model: HF hub id, local checkpoint directory, or None / "embedded" for the embedded SmolLM2-135M."""
    heads: str | None = None
    """--heads: directory of trained Medusa heads; None = the heads shipped for the embedded model."""
    device: str | None = None
    """--device: "cpu", "cuda", "cuda:1"...; None = CUDA when available, else CPU."""
    dtype: str | None = None
    """--dtype: float32, bfloat16 or float16; None = float32 on CPU, bfloat16 on CUDA."""
    backend: str = "auto"
    """--backend: the decoding backbone: "fast" (our static-cache model), "hf" (transformers), "auto"."""
    max_seq_len: int = 2048
    """--max-seq-len: KV cache capacity in tokens (prompt + new tokens + one tree)."""
    compile: bool = False
    """--compile: torch.compile each decode step (GPU: fuses small kernels; the first call compiles, minutes)."""

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_seq_len < 16:
            raise ValueError(f"--max-seq-len must be >= 16, got {self.max_seq_len}")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"--device {self.device!r} is not a device name such as cpu or cuda:0") from exc
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device!r}: CUDA is not available on this machine")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(resolve_device(self.device or "auto"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype or "auto", str(self.torch_device))


def resolve_heads_dir(spec: str | None, model: str | None = None) -> Path:
    """``--heads`` or, when omitted, the shipped heads; a clear error when there are none."""
    if spec:
        return Path(spec).expanduser()
    found = default_heads_dir(model)
    if found is None:
        raise MedusaError(
            "no Medusa heads given and none are installed: pass --heads DIR (train with `medusa-llama train`)"
        )
    return found


def load_backbone_and_heads(opts: ModelOptions):
    """The decoding backbone (a Medusa-2 adapter beside the heads merged in) and its heads, checked against each
    other. Returns ``(backbone, heads)``."""
    heads_dir = resolve_heads_dir(opts.heads, opts.model)
    if not heads_dir.exists():
        raise MedusaError(f"--heads {heads_dir}: no such directory")
    dtype = str(opts.torch_dtype).removeprefix("torch.")
    backbone = load_pipeline_backbone(
        opts.model, str(opts.torch_device), dtype, opts.max_seq_len, opts.backend, adapter_dir_of(heads_dir)
    )
    heads = load_heads(heads_dir, backbone)
    log.info("model %s, heads %s (%d heads), %s %s", backbone.name, heads_dir, heads.num_heads, backbone.device, dtype)
    return backbone, heads


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model and core count: recorded in every report."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work before reading a timer."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
