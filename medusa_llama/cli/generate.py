"""``medusa-llama generate``: chat with the model, Medusa tree decoding, streamed, then one line of statistics."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medusa_llama.decode.acceptance import ACCEPTANCE_RULES
from medusa_llama.decode.backbone import BACKENDS
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.heads import MedusaHeads
from medusa_llama.decode.tree import BUILTIN_TREE_NAMES, DEFAULT_TREE
from medusa_llama.pipeline import (
    adapter_dir_of,
    default_heads_dir,
    default_tree_spec,
    load_pipeline_backbone,
    load_tree,
    resolve_device,
)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The model options every decoding and evaluation command shares."""
    p.add_argument("--model", default=None, help="HF model id or local directory (default: the embedded SmolLM2-135M)")
    p.add_argument(
        "--heads",
        default=None,
        help="Medusa heads directory or medusa_heads.safetensors (default: the shipped heads of the "
        "embedded model); an adapter/ folder beside them (Medusa-2) is merged into the model",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on GPU)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="fast: our static-cache Llama forward (CUDA graphs on GPU); hf: the HF forward; auto: fast "
        "where it covers the architecture",
    )
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV cache size in tokens (default 2048)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (experimental: checked on CPU only; the first call compiles)",
    )


def add_tree_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tree",
        default=None,
        help=f"built-in tree ({', '.join(BUILTIN_TREE_NAMES)}) or a JSON file of medusa_choices paths (default: the "
        f"tree chosen for this device saved beside the heads, tree_cpu.json / tree_cuda.json, else {DEFAULT_TREE})",
    )


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--acceptance",
        default="auto",
        choices=("auto", *ACCEPTANCE_RULES),
        help="greedy: lossless; sampling: lossless rejection sampling for temperature > 0; typical: "
        "Medusa's typical acceptance, faster but NOT lossless; auto: greedy at temperature 0, "
        "else sampling",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with Medusa tree decoding",
        description="Generate a chat answer with Medusa tree decoding, streaming the text as it is "
        "accepted, then print one line of statistics.",
    )
    p.add_argument("prompt", help="the user message (the chat template is applied)")
    add_model_options(p)
    add_tree_option(p)
    add_sampling_options(p)
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, no chat template")
    p.add_argument("--vanilla", action="store_true", help="decode without heads (one token per step), to compare")
    p.set_defaults(func=run_generate)


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    if not chat or getattr(tokenizer, "chat_template", None) is None:
        return tokenizer(prompt)["input_ids"]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def build_decoder(args, need_heads: bool = True):
    """(backbone, decoder) from the shared options; vanilla if asked or if no heads are available.

    Heads and tree are read and checked first, so a bad file fails before the model loads.
    """
    heads_dir = Path(args.heads) if args.heads else default_heads_dir(args.model)
    vanilla = getattr(args, "vanilla", False) or heads_dir is None
    heads = tree = None
    if not vanilla:
        heads = MedusaHeads.load(heads_dir)
        tree = load_tree(args.tree or default_tree_spec(heads_dir, resolve_device(args.device)), heads.num_heads)
    elif heads_dir is None and need_heads and not getattr(args, "vanilla", False):
        print(
            "note: no trained Medusa heads are installed for this model (pass --heads DIR): decoding "
            "without heads, one token per step",
            file=sys.stderr,
        )
    adapter = getattr(args, "adapter_dir", None) or (None if vanilla else adapter_dir_of(heads_dir))
    backbone = load_pipeline_backbone(args.model, args.device, args.dtype, args.max_seq_len, args.backend, adapter)
    if vanilla:
        return backbone, VanillaDecoder(backbone, compile=args.compile)
    return backbone, MedusaDecoder(backbone, heads, tree, compile=args.compile)


def run_generate(args) -> int:
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, acceptance=args.acceptance, seed=args.seed
    )
    cfg.acceptance_config()  # validate before loading anything
    backbone, decoder = build_decoder(args)
    ids = encode_prompt(backbone.tokenizer, args.prompt, chat=not args.no_chat)
    tok = backbone.tokenizer
    state = {"ids": [], "text": ""}

    def stream(new: list[int]) -> None:
        state["ids"].extend(new)
        text = tok.decode(state["ids"], skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            sys.stdout.write(text[len(state["text"]) :])
            sys.stdout.flush()
            state["text"] = text

    res = decoder.generate(ids, cfg, on_tokens=stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    kind = "medusa" if isinstance(decoder, MedusaDecoder) else "vanilla"
    tree = f", tree {decoder.tree.size}" if kind == "medusa" else ""
    print(
        f"[{kind}{tree}] {len(res.tokens)} new tokens in {res.steps} steps | mean accepted "
        f"{res.mean_accepted:.2f} tokens/step | {res.tokens_per_s:.1f} tok/s | first token "
        f"{res.prefill_s * 1000:.0f} ms | {res.total_s:.2f} s | {backbone.device}",
        file=sys.stderr,
    )
    return 0
