"""``medusa-llama draft-vocab``: the heads' draft vocabulary, the N most frequent tokens of a prepared dataset.

FR-Spec (Zhao et al., 2025, "FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked
Speculative Sampling", arXiv:2502.14856, Sec. 3) ranks tokens by their frequency in a corpus and restricts the
drafter's LM head to the top N. Here the corpus is the train split of a ``prepare``d dataset, counted at its loss
positions (the answers the heads learn to predict). The ids, most frequent first (ties: lower id first), go into
``draft_vocab.safetensors`` in the heads directory, where ``load_heads`` finds them; decoding then proposes from
them by default (``heads.DraftVocab``). Coverage, the share of loss-position tokens inside the N, bounds how often a
true next token can be proposed at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medusa_llama.decode.heads import CONFIG_NAME, DRAFT_VOCAB_NAME
from medusa_llama.decode.heads_io import load_heads, save_draft_vocab
from medusa_llama.errors import MedusaError
from medusa_llama.train.blocks import TokenBlocks, load_meta

CHUNK_BLOCKS = 4096
"""Blocks counted at a time (4096 x 512 tokens: 8 MB of uint32), so any dataset is counted in bounded memory."""


@dataclass
class DraftVocabConfig:
    data: str
    """A directory written by ``medusa-llama prepare`` (its train split is counted at loss positions)."""
    heads: str
    """The heads directory that receives draft_vocab.safetensors (nothing else in it is touched)."""
    size: int = 8192
    """N: tokens in the draft vocabulary (capped at the tokens that occur in the data)."""
    overwrite: bool = False
    """Replace an existing draft_vocab.safetensors."""

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")


@dataclass
class DraftVocabSummary:
    path: Path
    size: int
    """N written (the requested size, or fewer when fewer distinct tokens occur)."""
    coverage: float
    """Share of the train split's loss-position tokens that are among the N."""
    loss_tokens: int

    def line(self) -> str:
        return (
            f"wrote {self.path}: {self.size} tokens cover {100 * self.coverage:.2f}% of the "
            f"{self.loss_tokens:,} loss-position tokens of the train split"
        )


def count_loss_tokens(data_dir: str | Path, vocab_size: int) -> np.ndarray:
    """(V,) int64: how often each token id occurs at a loss position (mask 1) of the train split."""
    blocks = TokenBlocks(data_dir, "train", load_meta(data_dir))
    counts = np.zeros(vocab_size, dtype=np.int64)
    for lo in range(0, len(blocks), CHUNK_BLOCKS):
        tokens = np.asarray(blocks.tokens[lo : lo + CHUNK_BLOCKS])  # (n, T) uint32
        mask = np.asarray(blocks.mask[lo : lo + CHUNK_BLOCKS]).astype(bool)  # (n, T)
        picked = tokens[mask]  # (m,) loss-position tokens
        if picked.size and int(picked.max()) >= vocab_size:
            raise MedusaError(f"{data_dir} holds token id {int(picked.max())}, beyond the heads' vocab {vocab_size}")
        counts += np.bincount(picked, minlength=vocab_size)
    return counts


def rank_tokens(counts: np.ndarray, size: int) -> torch.Tensor:
    """(N,) long: the ``size`` most frequent ids that occur at all, most frequent first, ties by lower id."""
    order = np.lexsort((np.arange(counts.size), -counts))  # by count descending, then id ascending
    order = order[counts[order] > 0][:size]
    return torch.from_numpy(order.astype(np.int64))


def make_draft_vocab(config: DraftVocabConfig) -> DraftVocabSummary:
    """Count, rank, write. Refuses (before counting) a directory without heads or an existing file."""
    heads_dir = Path(config.heads).expanduser()
    if not (heads_dir / CONFIG_NAME).is_file():
        raise MedusaError(f"--heads {heads_dir} is not a heads directory (no {CONFIG_NAME})")
    if (heads_dir / DRAFT_VOCAB_NAME).exists() and not config.overwrite:
        raise MedusaError(
            f"{heads_dir / DRAFT_VOCAB_NAME} exists: pass --overwrite to replace it (nothing was written)"
        )
    vocab_size = load_heads(heads_dir, draft=False).config.vocab_size
    counts = count_loss_tokens(config.data, vocab_size)
    total = int(counts.sum())
    if total == 0:
        raise MedusaError(f"{config.data}: the train split has no loss-position tokens")
    ids = rank_tokens(counts, config.size)
    path = save_draft_vocab(ids, heads_dir, overwrite=config.overwrite)
    return DraftVocabSummary(path, int(ids.numel()), float(counts[ids.numpy()].sum()) / total, total)
