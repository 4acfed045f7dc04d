"""The seed's data-preparation entry point: ``python preprocess_data.py --dataset_name wikitext --block_size 1024``.

A thin wrapper over ``medusa-llama prepare`` (same options; see ``medusa_llama/train/prepare.py``).
"""

from __future__ import annotations

import argparse
import sys

from medusa_llama import cli
from medusa_llama.cli.options import Parser
from medusa_llama.cli.train import add_prepare_args, run_prepare


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="preprocess_data.py", description="Tokenize and pack a dataset for Medusa training.")
    cli.add_global_args(parser)
    add_prepare_args(parser)
    parser.set_defaults(func=run_prepare)
    return parser


if __name__ == "__main__":
    sys.exit(cli.run(sys.argv[1:], parser=build_parser()))
