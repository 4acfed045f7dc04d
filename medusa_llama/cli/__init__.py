"""The ``medusa-llama`` command. Thin: parse, call one library function, print.

Each group of subcommands is a module here (``generate``, ``train``, ``eval``, ...) that registers itself; their flags
are derived from the config dataclasses (``options.py``). Every expected failure (``MedusaError``, ``ValueError``
from config validation, ``OSError``) and every usage error becomes one line on stderr, ``error: ...``, and exit
code 2; anything else one line and exit code 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medusa_llama.cli.options import Parser
from medusa_llama.errors import MedusaError

EXPECTED = (MedusaError, ValueError, OSError)
"""Failures caused by the input (bad flags, files, models): exit code 2. UnicodeError is a ValueError."""


def add_global_args(p: argparse.ArgumentParser, in_subcommand: bool = False) -> None:
    """``-v`` and ``--debug``, accepted before and after the subcommand name."""
    default = argparse.SUPPRESS if in_subcommand else False  # a subcommand must not reset what was given before it
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages")
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    from medusa_llama.cli import eval as commands_eval
    from medusa_llama.cli import export as commands_export
    from medusa_llama.cli import generate as commands_generate
    from medusa_llama.cli import serve as commands_serve
    from medusa_llama.cli import train as commands_train

    parser = Parser(
        prog="medusa-llama",
        description="Lossless Medusa speculative decoding with tree attention, trained by QLoRA self-distillation.",
    )
    add_global_args(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (commands_generate, commands_train, commands_eval, commands_export, commands_serve):
        module.register(sub)
    for command in sub.choices.values():
        add_global_args(command, in_subcommand=True)
    return parser


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the first non-empty one; --debug shows all)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def run(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error, already printed on one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        if isinstance(exc, EXPECTED):
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        print(
            f"error: {type(exc).__name__}: {one_line(exc)} (unexpected: --debug shows the traceback)", file=sys.stderr
        )
        return 1


def main() -> None:
    sys.exit(run())
