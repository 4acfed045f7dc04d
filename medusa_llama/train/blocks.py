"""A prepared dataset on disk, the reading side: ``meta.json`` and the (N, T) token/mask memmaps of each split.

``prepare.py`` writes this layout (its module docstring describes it); training, the draft-vocabulary counter and
the benchmarks read it through ``load_meta`` and ``TokenBlocks`` without importing the preparation machinery.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medusa_llama.errors import MedusaError

META_NAME = "meta.json"
PROMPTS_NAME = "prompts_val.jsonl"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def load_meta(data_dir: str | Path) -> dict:
    """``meta.json`` of a prepared directory; ``MedusaError`` naming the fix when absent or foreign."""
    path = Path(data_dir).expanduser() / META_NAME
    if not path.is_file():
        raise MedusaError(f"{data_dir} is not a prepared dataset (no {META_NAME}): run `medusa-llama prepare` first")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedusaError(f"corrupt {path}: {exc}") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise MedusaError(f"{path} has format {meta.get('format')}, expected {FORMAT_VERSION}: re-run prepare")
    return meta


class TokenBlocks:
    """Read-only memmap view of one split: ``blocks[idx] -> (tokens int64 (n, T), mask float32 (n, T))``."""

    def __init__(self, data_dir: str | Path, split: str, meta: dict | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        directory = Path(data_dir).expanduser()
        meta = meta or load_meta(directory)
        self.block_size = meta["block_size"]
        n = meta["splits"][split]["blocks"]
        shape = (n, self.block_size)
        if n == 0:
            self.tokens = np.zeros(shape, dtype=np.uint32)
            self.mask = np.zeros(shape, dtype=np.uint8)
            return
        for suffix, itemsize in (("tokens.u32", 4), ("mask.u8", 1)):
            path = directory / f"{split}.{suffix}"
            if not path.is_file() or path.stat().st_size != n * self.block_size * itemsize:
                raise MedusaError(f"{path} is missing or truncated: re-run `medusa-llama prepare`")
        self.tokens = np.memmap(directory / f"{split}.tokens.u32", dtype=np.uint32, mode="r", shape=shape)
        self.mask = np.memmap(directory / f"{split}.mask.u8", dtype=np.uint8, mode="r", shape=shape)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(np.asarray(idx))  # sorted reads are sequential on disk; order within a batch is irrelevant
        tokens = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (n, T)
        mask = torch.from_numpy(self.mask[idx].astype(np.float32))  # (n, T)
        return tokens, mask


def write_blocks(directory: str | Path, split: str, tokens: np.ndarray, mask: np.ndarray) -> None:
    """Write ready-made (N, T) blocks of one split (tests and tools); ``meta.json`` is the caller's job."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(tokens, dtype=np.uint32).tofile(directory / f"{split}.tokens.u32")
    np.ascontiguousarray(mask, dtype=np.uint8).tofile(directory / f"{split}.mask.u8")
