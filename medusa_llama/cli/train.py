"""``medusa-llama prepare`` and ``medusa-llama train``: flags -> ``PrepareConfig`` / ``TrainConfig`` -> library call.

Every flag defaults to None here, so each default lives once, in the config dataclass. The seed's underscore
spellings (``--dataset_name``, ``--block_size``, ``--student_name``, ``--batch_size``, ``--save_dir``) are accepted
as aliases; ``preprocess_data.py`` and ``train_kd.py`` at the repository root reuse these parsers.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from medusa_llama.train.loop import STAGES, TrainConfig
from medusa_llama.train.prepare import PrepareConfig


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls)}


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    d = _defaults(PrepareConfig)
    p.add_argument(
        "--dataset",
        "--dataset_name",
        dest="dataset",
        help=f"sharegpt, wikitext, wikitext2, or a .txt/.jsonl file (default {d['dataset']})",
    )
    p.add_argument("--model", help="backbone whose tokenizer/chat template to use (default: the embedded SmolLM2)")
    p.add_argument("--out", help="output directory (default data/<dataset>)")
    p.add_argument(
        "--block-size",
        "--block_size",
        dest="block_size",
        type=int,
        help=f"tokens per sequence (default {d['block_size']})",
    )
    p.add_argument(
        "--val-fraction", type=float, help=f"held-out share, by hash of record id (default {d['val_fraction']})"
    )
    p.add_argument("--limit", type=int, help="read at most this many records")
    p.add_argument("--self-distill", type=int, help="answer up to N chats with the backbone's own greedy output")
    p.add_argument("--max-new-tokens", type=int, help=f"longest self-distilled answer (default {d['max_new_tokens']})")
    p.add_argument(
        "--distill-batch-size", type=int, help=f"prompts per generate call (default {d['distill_batch_size']})"
    )
    p.add_argument("--device", help="device for self-distillation (default: cuda when available)")


def prepare_config(args: argparse.Namespace) -> PrepareConfig:
    names = {f.name for f in fields(PrepareConfig)}
    return PrepareConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = _defaults(TrainConfig)
    p.add_argument("--data", help=f"prepared dataset directory (default {d['data']})")
    p.add_argument("--model", "--student_name", dest="model", help="backbone HF id or directory (default: embedded)")
    p.add_argument("--save-dir", "--save_dir", dest="save_dir", help=f"output directory (default {d['save_dir']})")
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--num-heads", type=int, help=f"K heads, head k predicts t+k+1 (default {d['num_heads']})")
    heads.add_argument("--offsets", type=int, nargs="+", help="seed spelling: offsets 1..K = K heads (1 2 3: 3 heads)")
    p.add_argument("--head-kind", choices=("medusa", "sequential"), help=f"default {d['head_kind']}")
    p.add_argument("--lm-head", choices=("shared", "own"), help=f"default {d['lm_head']}")
    p.add_argument("--num-layers", type=int, help=f"residual blocks per head (default {d['num_layers']})")
    p.add_argument("--stage", choices=STAGES, help=f"default {d['stage']}")
    p.add_argument("--medusa1-steps", type=int, help="heads-only warm-up steps of --stage both (default: a quarter)")
    p.add_argument("--epochs", type=float, help=f"default {d['epochs']}")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, help=f"per process (default {d['batch_size']})"
    )
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per step (default {d['grad_accum']})")
    p.add_argument("--lr", type=float, help=f"LoRA learning rate (default {d['lr']})")
    p.add_argument("--head-lr-mult", type=float, help=f"heads lr = lr x this (default {d['head_lr_mult']})")
    p.add_argument("--weight-decay", type=float, help=f"default {d['weight_decay']}")
    p.add_argument("--warmup-steps", type=int, help=f"default {d['warmup_steps']}")
    p.add_argument("--max-grad-norm", type=float, help=f"default {d['max_grad_norm']}")
    p.add_argument("--lambda-decay", type=float, help=f"head k loss weight lambda^k (default {d['lambda_decay']})")
    p.add_argument("--init-heads", default=None, help="start from trained heads (e.g. Medusa-1 before Medusa-2)")
    p.add_argument("--soft-targets", action="store_true", default=None, help="heads learn the backbone's distribution")
    p.add_argument("--lm-loss-weight", type=float, help=f"stage-2 LM KL weight (default {d['lm_loss_weight']})")
    p.add_argument("--qlora", action="store_true", default=None, help="4-bit NF4 backbone for stage 2")
    p.add_argument("--lora-r", type=int, help=f"default {d['lora_r']}")
    p.add_argument("--lora-alpha", type=int, help=f"default {d['lora_alpha']}")
    p.add_argument("--lora-dropout", type=float, help=f"default {d['lora_dropout']}")
    p.add_argument("--grad-checkpointing", action="store_true", default=None, help="recompute backbone activations")
    p.add_argument("--eval-every", type=int, help=f"default {d['eval_every']}")
    p.add_argument("--eval-batches", type=int, help=f"default {d['eval_batches']}")
    p.add_argument("--save-every", type=int, help=f"default {d['save_every']}")
    p.add_argument("--log-every", type=int, help=f"default {d['log_every']}")
    p.add_argument("--chunk-tokens", type=int, help=f"positions per heads-loss chunk (default {d['chunk_tokens']})")
    p.add_argument("--resume", action="store_true", default=None, help="continue from save_dir/last")
    p.add_argument("--seed", type=int, help=f"default {d['seed']}")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="fp32 on GPU")
    p.add_argument("--device", help="default: the accelerate device")


def num_heads_from_offsets(offsets: list[int]) -> int:
    """The seed's ``--offsets 1 2 3``: head i predicts t+1+offset_i, so offsets must be exactly 1..K (K heads)."""
    if sorted(offsets) != list(range(1, len(offsets) + 1)):
        raise ValueError(f"--offsets must be 1 2 ... K (head k predicts token t+k+1), got {offsets}")
    return len(offsets)


def train_config(args: argparse.Namespace, **overrides) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if v is not None}
    if "offsets" in values:
        values["num_heads"] = num_heads_from_offsets(values.pop("offsets"))
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in values.items() if k in names}, **overrides})


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


def register(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a dataset into training memmaps (+ held-out prompts)")
    add_prepare_args(p)
    p.set_defaults(func=run_prepare)
    p = sub.add_parser("train", help="train Medusa heads (Medusa-1) and optionally (Q)LoRA jointly (Medusa-2)")
    add_train_args(p)
    p.set_defaults(func=run_train)
