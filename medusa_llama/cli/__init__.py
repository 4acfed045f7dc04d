"""The ``medusa-llama`` command. Thin: parse, call one library function, print.

Each subcommand lives beside the library code it drives (``commands_*.py``) and registers itself here.
Every ``MedusaError`` (and ``ValueError`` from config validation) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medusa_llama.errors import MedusaError


def build_parser() -> argparse.ArgumentParser:
    from medusa_llama.cli import eval as commands_eval
    from medusa_llama.cli import export as commands_export
    from medusa_llama.cli import generate as commands_generate
    from medusa_llama.cli import train as commands_train

    parser = argparse.ArgumentParser(
        prog="medusa-llama",
        description="Lossless Medusa speculative decoding with tree attention, trained by QLoRA self-distillation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (commands_generate, commands_train, commands_eval, commands_export):
        module.register(sub)
    return parser


def run(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    try:
        return int(args.func(args) or 0)
    except (MedusaError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main() -> None:
    sys.exit(run())
