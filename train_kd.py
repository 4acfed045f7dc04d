"""The seed's training entry point (Medusa-1 warm-up, then Medusa-2 joint self-distillation, by default):

    python train_kd.py --student_name NousResearch/Llama-2-7b-chat-hf --offsets 1 2 3 --batch_size 4 \\
        --epochs 3 --qlora --save_dir experiments/medusa_run

``--offsets 1 2 3`` means three heads predicting tokens t+2, t+3, t+4 (the LM head predicts t+1). A thin wrapper
over ``medusa-llama train`` with ``--stage both`` as its default; every other option is the same.
"""

from __future__ import annotations

import argparse
import sys

from medusa_llama import cli
from medusa_llama.cli.options import Parser
from medusa_llama.cli.train import add_train_args, print_result, train_config


def run(args: argparse.Namespace) -> int:
    from medusa_llama.train.loop import train

    overrides = {} if args.stage is not None else {"stage": "both"}
    print_result(train(train_config(args, **overrides)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="train_kd.py", description="Train Medusa heads with QLoRA self-distillation.")
    cli.add_global_args(parser)
    add_train_args(parser)
    parser.set_defaults(func=run)
    return parser


if __name__ == "__main__":
    sys.exit(cli.run(sys.argv[1:], parser=build_parser()))
