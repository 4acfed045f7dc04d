"""``python evaluate.py``: the seed's benchmark entry point, the same as ``medusa-llama bench`` (same options).

Example: ``python evaluate.py --limit 20 --max-new-tokens 128 --baselines hf --out results/report.json``
"""

from __future__ import annotations

import argparse
import sys

from medusa_llama.cli import add_global_args, run
from medusa_llama.cli.eval import add_bench_args, cmd_bench
from medusa_llama.cli.options import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="evaluate.py",
        description="Benchmark Medusa against vanilla decoding (tokens/s, latency, acceptance, losslessness).",
    )
    add_global_args(parser)
    add_bench_args(parser)
    parser.set_defaults(func=cmd_bench)
    return parser


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], parser=build_parser()))
