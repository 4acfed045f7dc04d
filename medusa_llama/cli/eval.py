"""CLI subcommands for evaluation: ``bench``, ``heads-accuracy`` and ``tree``. Thin: parse, call, print."""

from __future__ import annotations

import argparse

from medusa_llama.cli.generate import add_model_options
from medusa_llama.decode.tree import BUILTIN_TREE_NAMES
from medusa_llama.eval.bench import BenchConfig
from medusa_llama.eval.head_accuracy import HeadAccuracyConfig
from medusa_llama.eval.tree_opt import TreeOptConfig

# Defaults come from the config dataclasses (declared once there); help texts show them as %(default)s.


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model options every evaluation command shares (``eval_setup.ModelOptions``), as ``generate`` has them."""
    add_model_options(p.add_argument_group("model"))


def _model_kwargs(args) -> dict:
    auto = lambda v: None if v == "auto" else v  # noqa: E731 - ModelOptions spells "auto" as None
    return dict(
        model=args.model, heads=args.heads, device=auto(args.device), dtype=auto(args.dtype), backend=args.backend,
        max_seq_len=args.max_seq_len, compile=args.compile,
    )  # fmt: skip


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """``bench`` options (shared with ``python evaluate.py``)."""
    add_model_args(p)
    p.add_argument("--prompts", default=None, help="JSONL prompts ('prompt' or 'turns'); default: built-in held-out")
    p.add_argument("--limit", type=int, default=BenchConfig.limit, help="number of prompts (default: %(default)s)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=BenchConfig.max_new_tokens,
        help="new tokens per prompt (default: %(default)s)",
    )
    p.add_argument(
        "--tree", default=BenchConfig.tree,
        help=f"{' | '.join(BUILTIN_TREE_NAMES)}, a medusa_choices JSON file, auto (optimise here first), or default: "
        "the tree saved beside the heads for this device (tree_cpu.json / tree_cuda.json), else tree64",
    )  # fmt: skip
    p.add_argument("--accuracy", default=None, help="heads_accuracy.json (for --tree auto and the expected figure)")
    p.add_argument(
        "--acceptance", default=BenchConfig.acceptance, help="greedy | typical | sampling | auto (default: %(default)s)"
    )
    p.add_argument(
        "--temperature", type=float, default=BenchConfig.temperature, help="0 = greedy (default: %(default)s)"
    )
    p.add_argument("--baselines", default="", help="'hf': also HF generate greedy and HF prompt lookup")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation of each method")
    p.add_argument("--out", default=BenchConfig.out, help="JSON report; .md and PNGs beside it (default: %(default)s)")


def bench_config(args) -> BenchConfig:
    return BenchConfig(
        **_model_kwargs(args), prompts=args.prompts, limit=args.limit, max_new_tokens=args.max_new_tokens,
        tree=args.tree, accuracy=args.accuracy, acceptance=args.acceptance, temperature=args.temperature,
        baselines=tuple(b for b in args.baselines.split(",") if b), warmup=not args.no_warmup, out=args.out,
    )  # fmt: skip


def cmd_bench(args) -> int:
    from medusa_llama.eval.bench import run_bench

    report = run_bench(bench_config(args))
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

    cfg = HeadAccuracyConfig(
        **_model_kwargs(args), prompts=args.prompts, limit=args.limit, skip=args.skip,
        max_new_tokens=args.max_new_tokens, topk=args.topk, out=args.out,
    )  # fmt: skip
    report = run_head_accuracy(cfg)
    print(format_accuracy(report))
    print(f"wrote {cfg.out}")
    return 0


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers such as 1,4,16,64, got {text!r}") from None


def cmd_tree(args) -> int:
    from medusa_llama.eval.tree_opt import run_tree_opt

    cfg = TreeOptConfig(
        **_model_kwargs(args), accuracy=args.accuracy, sizes=_sizes(args.sizes) if args.sizes else None,
        prompts=args.prompts, probe_prompts=args.probe_prompts, probe_tokens=args.probe_tokens,
        accuracy_prompts=args.accuracy_prompts, accuracy_tokens=args.accuracy_tokens, out=args.out,
    )  # fmt: skip
    result = run_tree_opt(cfg)
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
    add_model_args(p)
    p.add_argument("--prompts", default=None, help="JSONL prompts; default: built-in held-out ShareGPT prompts")
    p.add_argument(
        "--limit", type=int, default=HeadAccuracyConfig.limit, help="number of prompts (default: %(default)s)"
    )
    p.add_argument(
        "--skip", type=int, default=HeadAccuracyConfig.skip, help="skip this many prompts first (default: %(default)s)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=HeadAccuracyConfig.max_new_tokens,
        help="continuation length per prompt (default: %(default)s)",
    )
    p.add_argument(
        "--topk",
        type=int,
        default=HeadAccuracyConfig.topk,
        help="ranks scored per head, at most 10 (default: %(default)s)",
    )
    p.add_argument("--out", default=HeadAccuracyConfig.out, help="output JSON (default: %(default)s)")
    p.set_defaults(func=cmd_heads_accuracy)

    p = sub.add_parser(
        "tree", help="choose the tree with the best expected tokens/s on this device",
        description="Measure the verify latency of trees of several sizes here, then pick the tree maximising "
        "expected accepted length / step latency. Writes a medusa_choices JSON for --tree FILE.",
    )  # fmt: skip
    add_model_args(p)
    p.add_argument("--accuracy", default=None, help="heads_accuracy.json (default: measure it first)")
    p.add_argument(
        "--sizes", default=None,
        help="comma-separated tree sizes to time, 1 = vanilla (default: 1,4,8,...,256 on a GPU, 1,2,4,...,64 on a CPU)",
    )  # fmt: skip
    p.add_argument("--prompts", default=None, help="JSONL prompts; default: built-in held-out ShareGPT prompts")
    p.add_argument(
        "--probe-prompts",
        type=int,
        default=TreeOptConfig.probe_prompts,
        help="generations per tree size (default: %(default)s)",
    )
    p.add_argument(
        "--probe-tokens",
        type=int,
        default=TreeOptConfig.probe_tokens,
        help="new tokens per timing generation (default: %(default)s)",
    )
    p.add_argument(
        "--accuracy-prompts",
        type=int,
        default=TreeOptConfig.accuracy_prompts,
        help="prompts for measuring accuracy (default: %(default)s)",
    )
    p.add_argument(
        "--accuracy-tokens",
        type=int,
        default=TreeOptConfig.accuracy_tokens,
        help="tokens per accuracy prompt (default: %(default)s)",
    )
    p.add_argument("--out", default=TreeOptConfig.out, help="output tree file (default: %(default)s)")
    p.set_defaults(func=cmd_tree)
