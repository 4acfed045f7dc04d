"""The seed's entry point: Medusa tree decoding with its flag names.

    python decode_tree.py --base_model_id MODEL --adapter_dir DIR --mtp_ckpt_path HEADS [--prompt TEXT]

Same as `medusa-llama generate`; --base_model_id = --model, --mtp_ckpt_path = --heads, --adapter_dir = --adapter
(a LoRA adapter, Medusa-2, merged into the model). Defaults: the embedded model and its shipped heads.
"""

import argparse
import sys

from medusa_llama.cli import add_global_args, run
from medusa_llama.cli.generate import add_decoder_args, add_sampling_args, run_generate
from medusa_llama.cli.options import Parser

SEED_ALIASES = {"model": ("--base_model_id",), "heads": ("--mtp_ckpt_path",), "adapter": ("--adapter_dir",)}


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="decode_tree.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_global_args(p)
    p.add_argument("--prompt", default="Explain in three sentences why the sky is blue.", help="the user message")
    add_decoder_args(p, aliases=SEED_ALIASES)
    add_sampling_args(p)
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text")
    p.set_defaults(func=run_generate)
    return p


if __name__ == "__main__":
    sys.exit(run(parser=parser()))
