"""The seed's entry point: Medusa tree decoding with its flag names.

    python decode_tree.py --base_model_id MODEL --adapter_dir DIR --mtp_ckpt_path HEADS [--prompt TEXT]

Same as `medusa-llama generate`; --base_model_id = --model, --mtp_ckpt_path = --heads, --adapter_dir = a LoRA
adapter (Medusa-2) merged into the model. Defaults: the embedded model and its shipped heads.
"""

import argparse
import sys

from medusa_llama.cli import run
from medusa_llama.cli.generate import add_model_options, add_sampling_options, add_tree_option, run_generate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--prompt", default="Explain in three sentences why the sky is blue.", help="the user message")
    add_model_options(p)
    add_tree_option(p)
    add_sampling_options(p)
    p.add_argument("--base_model_id", dest="model", help="alias of --model")
    p.add_argument("--mtp_ckpt_path", dest="heads", help="alias of --heads (file or directory)")
    p.add_argument("--adapter_dir", default=None, help="LoRA adapter directory to merge (Medusa-2)")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text")
    p.add_argument("--vanilla", action="store_true", help="decode without heads")
    p.set_defaults(func=run_generate)
    return p


if __name__ == "__main__":
    sys.exit(run(parser=parser()))
