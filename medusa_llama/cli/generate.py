"""``medusa-llama generate``: chat with the model, Medusa tree decoding, streamed, then one line of statistics."""

from __future__ import annotations

import argparse
import sys

from medusa_llama.cli.options import add_config_args, config_from_args
from medusa_llama.decode.acceptance import ACCEPTANCE_RULES
from medusa_llama.decode.backbone import BACKENDS
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import DecoderOptions, load_pipeline

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "acceptance", "seed")
"""The ``GenerationConfig`` fields that are flags of ``generate``."""
ACCEPTANCE_HELP = (
    "greedy: lossless; sampling: lossless rejection sampling for temperature > 0; typical: Medusa's typical "
    "acceptance, faster but NOT lossless; auto: greedy at temperature 0, else sampling"
)


def add_decoder_args(p: argparse.ArgumentParser, exclude: tuple[str, ...] = (), **kwargs) -> None:
    """The ``DecoderOptions`` flags (model, heads, tree, device, ...) that every decoding command shares."""
    group = p.add_argument_group("model, heads and tree")
    add_config_args(group, DecoderOptions, exclude=exclude, choices={"backend": BACKENDS}, **kwargs)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    add_config_args(
        p,
        GenerationConfig,
        only=SAMPLING_FIELDS,
        choices={"acceptance": ("auto", *ACCEPTANCE_RULES)},
        helps={"acceptance": ACCEPTANCE_HELP},
    )


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with Medusa tree decoding",
        description="Generate a chat answer with Medusa tree decoding, streaming the text as it is "
        "accepted, then print one line of statistics.",
    )
    p.add_argument("prompt", help="the user message (the chat template is applied)")
    add_decoder_args(p)
    add_sampling_args(p)
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, no chat template")
    p.set_defaults(func=run_generate)


def check_text(text: str, what: str = "the prompt") -> str:
    """Refuse text that is not valid UTF-8 (bytes that the command line could not decode arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start].encode("utf-8", "surrogateescape")
        raise MedusaError(f"{what} is not valid UTF-8 (byte 0x{bad.hex()} at character {exc.start})") from None
    return text


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    if not chat or getattr(tokenizer, "chat_template", None) is None:
        return tokenizer(prompt)["input_ids"]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def run_generate(args) -> int:
    prompt = check_text(args.prompt)
    cfg = config_from_args(GenerationConfig, args)
    cfg.acceptance_config()  # validate before loading anything
    pipe = load_pipeline(config_from_args(DecoderOptions, args))
    backbone, decoder = pipe.backbone, pipe.decoder
    ids = encode_prompt(backbone.tokenizer, prompt, chat=not args.no_chat)
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
    tree = f", tree {pipe.tree.size}" if pipe.tree is not None else ""
    print(
        f"[{kind}{tree}] {len(res.tokens)} new tokens in {res.steps} steps | mean accepted "
        f"{res.mean_accepted:.2f} tokens/step | {res.tokens_per_s:.1f} tok/s | first token "
        f"{res.prefill_s * 1000:.0f} ms | {res.total_s:.2f} s | {backbone.device}",
        file=sys.stderr,
    )
    return 0
