"""CLI subcommands for evaluation: ``bench``, ``heads-accuracy`` and ``tree``. Thin: parse, call, print.

Their flags are the fields of ``BenchConfig``, ``HeadAccuracyConfig`` and ``TreeOptConfig`` (``options.py``).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from medusa_llama.cli.generate import add_decoder_args
from medusa_llama.cli.options import add_config_args, config_from_args, field_docs
from medusa_llama.decode.acceptance import ACCEPTANCE_RULES
from medusa_llama.eval.bench import BASELINES, BenchConfig
from medusa_llama.eval.head_accuracy import HeadAccuracyConfig
from medusa_llama.eval.tree_opt import TreeOptConfig
from medusa_llama.pipeline import DecoderOptions

NOT_DECODING = ("tree", "vanilla")
"""Decoder options that mean nothing to the commands measuring heads or making a tree."""

SCORED_DRAFT = (
    " Head accuracy is scored over the same draft vocabulary, as decoding proposes from it (a true token outside it is"
    " never a hit); {where} records its size as draft_vocab (0: none)."
)
"""Appended to the --draft-vocab help of the commands that measure head accuracy."""


def add_eval_args(p: argparse.ArgumentParser, cls: type, **kwargs) -> None:
    """The decoder options, then the command's own fields of ``cls``."""
    docs = field_docs(DecoderOptions)
    if cls is BenchConfig:
        draft_help = " With --tree auto:" + SCORED_DRAFT.format(where="the report's tree_info")
        helps = {"tree": docs["tree"] + " auto: optimise the tree on this device first."}
        add_decoder_args(p, exclude=("vanilla",), helps={**helps, "draft_vocab": docs["draft_vocab"] + draft_help})
    else:
        draft_help = SCORED_DRAFT.format(where="the output JSON")
        add_decoder_args(p, exclude=NOT_DECODING, helps={"draft_vocab": docs["draft_vocab"] + draft_help})
    add_config_args(p, cls, exclude=tuple(f.name for f in fields(DecoderOptions)), **kwargs)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """``bench`` options (shared with ``python evaluate.py``)."""
    choices = {"acceptance": ("auto", *ACCEPTANCE_RULES)}
    add_eval_args(p, BenchConfig, choices=choices, helps={"baselines": _baselines_help()})


def _baselines_help() -> str:
    return f"{field_docs(BenchConfig)['baselines']} Known: {', '.join(BASELINES)}."


def cmd_bench(args) -> int:
    from medusa_llama.eval.bench import run_bench

    report = run_bench(config_from_args(BenchConfig, args))
    print(
        f"{len(report['prompts'])} prompts on {report['device']}: Medusa {report['medusa_tokens_per_s']:.1f} tok/s, "
        f"vanilla {report['baseline_tokens_per_s']:.1f} tok/s, speedup {report['speedup']:.2f}x, "
        f"{report['mean_accepted_tokens']:.2f} tokens/step, identical to greedy: {report['identical']}"
    )
    for name, s in report["speedups"].items():
        if name != "vanilla" and s:
            print(f"speedup over {name}: {s:.2f}x")
    print("wrote " + ", ".join(report["files"]))
    return 0


def cmd_heads_accuracy(args) -> int:
    from medusa_llama.eval.head_accuracy import format_accuracy, run_head_accuracy

    cfg = config_from_args(HeadAccuracyConfig, args)
    report = run_head_accuracy(cfg)
    print(format_accuracy(report))
    draft = report["draft_vocab"]
    print(f"scored over {f'a draft vocabulary of {draft} tokens' if draft else 'the full vocabulary'}")
    print(f"wrote {cfg.out}")
    return 0


def cmd_tree(args) -> int:
    from medusa_llama.eval.tree_opt import run_tree_opt

    result = run_tree_opt(config_from_args(TreeOptConfig, args))
    print("size  expected tok/step  latency ms  expected tok/s")
    for row in result["table"]:
        mark = "  <- chosen" if row["size"] == result["tree_size"] else ""
        print(
            f"{row['size']:>4d}  {row['expected_accept_length']:17.3f}  {row['latency_ms']:10.2f}  "
            f"{row['expected_tokens_per_s']:14.1f}{mark}"
        )
    print(f"wrote {result['out']} ({result['tree_size']} tokens); use it with --tree {result['out']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmark Medusa against vanilla decoding (and HF generate)",
        description="Decode each prompt with vanilla and Medusa decoding on the same backbone; report speed, "
        "acceptance and losslessness as JSON, Markdown and plots.",
    )  # fmt: skip
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "heads-accuracy", help="per-head top-k accuracy on held-out prompts (input of the tree optimizer)",
        description="Score each head's top-k candidates against the backbone's greedy continuations.",
    )  # fmt: skip
    add_eval_args(p, HeadAccuracyConfig)
    p.set_defaults(func=cmd_heads_accuracy)

    p = sub.add_parser(
        "tree", help="choose the tree with the best expected tokens/s on this device",
        description="Measure the verify latency of trees of several sizes here, then pick the tree maximising "
        "expected accepted length / step latency. Writes a medusa_choices JSON for --tree FILE.",
    )  # fmt: skip
    add_eval_args(p, TreeOptConfig)
    p.set_defaults(func=cmd_tree)
