"""``medusa-llama export``: write heads in vLLM's or FasterDecoding's Medusa format. Thin: parse, call, print."""

from __future__ import annotations

from medusa_llama.decode.formats import EXPORT_FORMATS, FASTER_DECODING, VLLM
from medusa_llama.decode.heads_io import export_heads_dir


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write `medusa` heads for vLLM or in the FasterDecoding format (which TensorRT-LLM converts)",
        description="Write Medusa heads for another engine. Only the paper's `medusa` heads can be expressed; "
        "heads that share the base LM head get a copy of it per head (the base model is loaded for that).",
    )
    p.add_argument("--heads", required=True, help="heads directory: ours, FasterDecoding's or vLLM's format")
    p.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help=f"{VLLM}: vLLM's Medusa draft model; {FASTER_DECODING}: FasterDecoding/Medusa's medusa_lm_head "
        "(TensorRT-LLM's convert_checkpoint.py --medusa_model_dir reads it)",
    )
    p.add_argument("--out", required=True, help="directory to create; must not exist or be empty")
    p.add_argument(
        "--model",
        default=None,
        help="base model (HF id or directory) whose LM head shared-LM-head heads copy; default: the heads' own",
    )
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    files = export_heads_dir(args.heads, args.format, args.out, args.model)
    print(f"wrote {args.format} heads: {', '.join(str(f) for f in files)}")
    return 0
