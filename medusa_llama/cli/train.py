"""``medusa-llama prepare`` and ``medusa-llama train``: flags -> ``PrepareConfig`` / ``TrainConfig`` -> library call.

The flags are the config fields (``options.py``), so each default lives once, in the dataclass. The seed's
underscore spellings (``--dataset_name``, ``--block_size``, ``--student_name``, ``--batch_size``, ``--save_dir``,
``--offsets``) are accepted as aliases; ``preprocess_data.py`` and ``train_kd.py`` at the repository root reuse
these parsers.
"""

from __future__ import annotations

import argparse
import os

from medusa_llama.cli.options import add_config_args, add_field_arg, config_from_args
from medusa_llama.decode.heads import HEAD_KINDS, LM_HEAD_MODES
from medusa_llama.train.draft_vocab import DraftVocabConfig
from medusa_llama.train.loop import STAGES, TrainConfig
from medusa_llama.train.prepare import PrepareConfig


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, PrepareConfig, aliases={"dataset": ("--dataset_name",), "block_size": ("--block_size",)})


def prepare_config(args: argparse.Namespace) -> PrepareConfig:
    return config_from_args(PrepareConfig, args)


def add_train_args(p: argparse.ArgumentParser) -> None:
    heads = p.add_mutually_exclusive_group()
    add_field_arg(heads, TrainConfig, "num_heads")
    heads.add_argument(
        "--offsets", type=int, nargs="+", help="the seed's spelling: offsets 1 2 ... K = K heads (1 2 3: 3 heads)"
    )
    add_config_args(
        p,
        TrainConfig,
        aliases={
            "model": ("--student_name",),
            "save_dir": ("--save_dir",),
            "batch_size": ("--batch_size",),
        },
        choices={"head_kind": HEAD_KINDS, "lm_head": LM_HEAD_MODES, "stage": STAGES},
    )


def num_heads_from_offsets(offsets: list[int]) -> int:
    """The seed's ``--offsets 1 2 3``: head i predicts t+1+offset_i, so offsets must be exactly 1..K (K heads)."""
    if sorted(offsets) != list(range(1, len(offsets) + 1)):
        raise ValueError(f"--offsets must be 1 2 ... K (head k predicts token t+k+1), got {offsets}")
    return len(offsets)


def train_config(args: argparse.Namespace, **overrides) -> TrainConfig:
    if getattr(args, "offsets", None) is not None:
        overrides = {"num_heads": num_heads_from_offsets(args.offsets), **overrides}
    return config_from_args(TrainConfig, args, **overrides)


def run_prepare(args: argparse.Namespace) -> int:
    from medusa_llama.train.prepare import prepare

    print(prepare(prepare_config(args)).line())
    return 0


def print_result(result) -> None:
    """The summary line, once: only the main process prints under ``accelerate launch`` / ``torchrun``."""
    if os.environ.get("RANK", "0") == "0":
        print(result.line())


def run_train(args: argparse.Namespace) -> int:
    from medusa_llama.train.loop import train

    print_result(train(train_config(args)))
    return 0


def run_draft_vocab(args: argparse.Namespace) -> int:
    from medusa_llama.train.draft_vocab import DraftVocabConfig, make_draft_vocab

    missing = [flag for flag in ("data", "heads") if not getattr(args, flag, None)]
    if missing:
        raise ValueError(f"draft-vocab needs --{missing[0]} DIR")
    print(make_draft_vocab(config_from_args(DraftVocabConfig, args)).line())
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a dataset into training memmaps (+ held-out prompts)")
    add_prepare_args(p)
    p.set_defaults(func=run_prepare)
    p = sub.add_parser("train", help="train Medusa heads (Medusa-1) and optionally (Q)LoRA jointly (Medusa-2)")
    add_train_args(p)
    p.set_defaults(func=run_train)
    p = sub.add_parser(
        "draft-vocab", help="the heads' draft vocabulary (FR-Spec): the N most frequent tokens of a prepared dataset",
        description="Count the tokens at loss positions of a prepared dataset's train split and write the N most "
        "frequent into the heads directory (draft_vocab.safetensors): decoding then proposes from them only, "
        "verification keeps the full vocabulary (lossless). Prints the coverage.",
    )  # fmt: skip
    add_config_args(p, DraftVocabConfig)
    p.set_defaults(func=run_draft_vocab)
