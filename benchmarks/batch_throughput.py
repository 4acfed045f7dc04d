"""Throughput of batched Medusa against batched vanilla decoding at several batch sizes (issue 10, item 4), and the
server's tree per batch size chosen from it.

Every decoder runs the same held-out prompts on the same backbone, B sequences per step, rows refilled as sequences
finish (continuous batching); greedy, so every output must equal its batch-size-1 output (checked in fp32 by the
tests; counted here as agreement with vanilla). Prints a table and writes JSON:

    python benchmarks/batch_throughput.py --batch-sizes 1,4,8,16,32 --prompts 64 --max-new-tokens 256 --out r.json

Where Medusa stops paying as B grows is where the server should switch to a smaller tree or to vanilla decoding.
``--write-serve-trees PATH`` measures several candidate trees per B (``--candidates``: the default tree, prefixes
of it of N nodes, built-in names) and writes the fastest per B as this device type's table in PATH (the server's
``serve_trees.json``; vanilla, the empty tree, wherever no tree beats it by ``--margin``). The table is rewritten
after every batch size, so a run cut short keeps what it measured; ``--budget-s`` stops starting measurements after
that many seconds. A candidate that fails is reported and skipped.

``--prefill graph|eager|both``: the batched decoder's prefill, by CUDA-graph replays (``graph_prefill``, the
decoder's and so the server's default; on a CPU, without graphs, it is the eager one) or eager; ``both`` measures
every batch size twice, eager then graph, side by side (one row each, ``prefill`` names it; the server's table then
takes the graph rows). Each candidate also reports its mean time to first token (``mean_prefill_ms``), where the
joining requests' prefill shows:

    python benchmarks/batch_throughput.py --batch-sizes 1,8 --prefill both --out r.json
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone

import torch

from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.decode.tree import build_tree, load_choices
from medusa_llama.eval.prompts import chat_ids, load_prompts
from medusa_llama.pipeline import DecoderOptions, device_name, fit_tree, load_pipeline
from medusa_llama.serve.bench import write_report
from medusa_llama.serve.trees import prefix_tree, write_device_table


def timed(decoder: BatchedDecoder, prompts: list[list[int]], cfg: GenerationConfig) -> tuple[float, list]:
    """Seconds to decode every prompt (device synchronised), and the results."""
    if decoder.backbone.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = decoder.generate_many(prompts, cfg)
    if decoder.backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, results


def measure(
    bb,
    heads,
    choices: list[list[int]],
    b: int,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    graph_prefill: bool = True,
) -> dict:
    """Tokens/s of a batched decoder of ``b`` rows with tree ``choices`` ([] : vanilla) over ``prompts``, after a
    short warm-up (CUDA graph capture: the steps', and with ``graph_prefill`` every prefill bucket's, before the
    clock). Returns the figures and the results."""
    tree = build_tree(fit_tree(choices, heads.num_heads), heads.num_heads) if choices else None
    decoder = BatchedDecoder(bb, b, heads if choices else None, tree, graph_prefill=graph_prefill)
    decoder.capture_prefills(max(len(p) for p in prompts), cfg)  # every prefill bucket the run can meet
    timed(decoder, prompts[:b], GenerationConfig(max_new_tokens=8))  # warm-up, graph capture
    seconds, results = timed(decoder, prompts, cfg)
    tokens = sum(len(r.tokens) for r in results)
    steps = sum(r.steps for r in results)
    return {
        "tree_size": len(choices) + 1,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "tokens": tokens,
        "mean_accepted_tokens": (tokens - len(results)) / steps if steps else 1.0,
        "mean_prefill_ms": 1e3 * sum(r.prefill_s for r in results) / len(results),
        "results": results,
    }


def candidate_trees(specs: list[str], default: list[list[int]]) -> dict[str, list[list[int]]]:
    """Named candidate trees: ``default`` (the pipeline's tree), ``N`` (the first N nodes of it, where N is smaller),
    or a built-in tree name / JSON file. Vanilla ([]) is always measured besides."""
    out: dict[str, list[list[int]]] = {}
    for spec in specs:
        if spec == "default":
            out[f"default({len(default) + 1})"] = default
        elif spec.isdigit():
            if 1 < int(spec) < len(default) + 1:
                out[f"prefix{spec}"] = prefix_tree(default, int(spec))
        else:
            out[spec] = load_choices(spec)
    return out


def choose(row: dict, margin: float) -> tuple[str, list[list[int]]]:
    """The fastest candidate of one batch size; vanilla unless a tree beats it by ``margin`` (noise guard)."""
    vanilla = row["candidates"].get("vanilla", {}).get("tokens_per_s")
    best_name, best = "vanilla", vanilla or 0.0
    for name, m in row["candidates"].items():
        if name != "vanilla" and "tokens_per_s" in m and m["tokens_per_s"] > best:
            best_name, best = name, m["tokens_per_s"]
    if vanilla is None or best_name == "vanilla" or best < vanilla * (1 + margin):
        return "vanilla", []
    return best_name, row["trees"][best_name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4,8,16,32", help="comma-separated batch sizes")
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts per batch size (at least B are used)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--heads", default=None, help="Medusa heads (default: the shipped default heads)")
    ap.add_argument("--tree", default=None, help="a static tree (default: the one saved beside the heads)")
    ap.add_argument("--prompt-file", default=None, help="a JSONL prompt file (default: the built-in held-out prompts)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="KV cache per row (prompt + new tokens + a tree)")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--write-serve-trees", default=None, metavar="PATH", help="write the server's tree table")
    ap.add_argument(
        "--candidates",
        default=None,
        help="trees to try per B: default, N (the default tree's first N nodes), built-in names, files "
        "(default: 'default' alone; with --write-serve-trees 'default,64,16,4'); vanilla is always measured",
    )
    ap.add_argument("--margin", type=float, default=0.03, help="a tree must beat vanilla by this fraction to be kept")
    ap.add_argument(
        "--prefill",
        choices=("graph", "eager", "both"),
        default="graph",
        help="the batched prefill: CUDA-graph replays (graph_prefill, the server's default), eager, or both",
    )
    ap.add_argument(
        "--budget-s", type=float, default=0.0, help="start no measurement after this many seconds (0: none)"
    )
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    specs = (args.candidates or ("default,64,16,4" if args.write_serve_trees else "default")).split(",")
    t_start = time.perf_counter()

    opts = DecoderOptions(
        heads=args.heads,
        tree=args.tree,
        device=args.device,
        dtype=args.dtype,
        backend="fast",
        max_seq_len=args.max_seq_len,
    )
    pipe = load_pipeline(opts, need_heads=True)
    bb = pipe.backbone
    default = [list(p) for p in load_choices(pipe.tree_spec)] if pipe.tree_spec else []
    default = fit_tree(default, pipe.heads.num_heads, pipe.tree_spec or "")
    trees = {"vanilla": [], **candidate_trees(specs, default)}
    held_out = [chat_ids(bb.tokenizer, p.text) for p in load_prompts(args.prompt_file)]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    dev_type, dev_name = bb.device.type, device_name(bb.device)
    modes = ["eager", "graph"] if args.prefill == "both" else [args.prefill]
    if not bb.supports_cuda_graphs:
        modes = ["eager"]  # no CUDA graphs here: the graph prefill is the eager one
    print(f"{dev_name} {bb.dtype}: trees {', '.join(f'{k} ({len(v) + 1})' for k, v in trees.items())}", flush=True)

    rows, chosen = [], {}
    for b, mode in [(b, mode) for b in sizes for mode in modes]:
        n = max(args.prompts, b)
        prompts = [held_out[i % len(held_out)] for i in range(n)]
        row = {"batch_size": b, "prefill": mode, "prompts": n, "candidates": {}, "trees": trees}
        reference = None  # vanilla's outputs, measured first
        for name, choices in trees.items():
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                row["candidates"][name] = {"skipped": f"past --budget-s {args.budget_s:.0f}"}
                continue
            try:
                m = measure(bb, pipe.heads, choices, b, prompts, cfg, graph_prefill=mode == "graph")
            except Exception as exc:  # one failing candidate (memory, a capture error) must not end the run
                row["candidates"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"B={b:3d}  {mode:5s} {name:14s} FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            results = m.pop("results")
            if name == "vanilla":
                reference = [r.tokens for r in results]
            if reference is not None:
                m["identical_to_vanilla"] = sum(r.tokens == v for r, v in zip(results, reference, strict=True))
            row["candidates"][name] = m
            same = m.get("identical_to_vanilla", "-")
            print(
                f"B={b:3d}  {mode:5s} {name:14s} {m['tokens_per_s']:9.1f} tok/s  "
                f"accepted/step {m['mean_accepted_tokens']:.2f}  first token {m['mean_prefill_ms']:.1f} ms  "
                f"identical to vanilla {same}/{n}  ({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )
        summarise(row)
        rows.append(row)
        if "tokens_per_s" in row["candidates"].get("vanilla", {}):
            name, chosen[b] = choose(row, args.margin)
            row["chosen"] = name
            print(f"B={b:3d}  {mode:5s} chosen: {name} ({len(chosen[b]) + 1} nodes)", flush=True)
        if args.write_serve_trees and chosen:
            write_device_table(
                args.write_serve_trees,
                dev_type,
                chosen,
                produced_by="python " + " ".join(sys.argv),
                device=dev_name,
                dtype=str(bb.dtype),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                complete=b == sizes[-1] and mode == modes[-1],
                measured=[{k: v for k, v in r.items() if k != "trees"} for r in rows],
            )
    write_report(
        args.out,
        bb,
        time.perf_counter() - t_start,
        tree_size=len(default) + 1,
        max_new_tokens=args.max_new_tokens,
        trees=trees,
        rows=rows,
    )


def summarise(row: dict) -> None:
    """The fields of the plain comparison (the default tree against vanilla) on the row itself."""
    cand = row["candidates"]
    v = cand.get("vanilla", {}).get("tokens_per_s")
    d = next((m for k, m in cand.items() if k.startswith("default") and "tokens_per_s" in m), None)
    if v and d:
        row.update(vanilla_tokens_per_s=v, medusa_tokens_per_s=d["tokens_per_s"], speedup=d["tokens_per_s"] / v)


if __name__ == "__main__":
    main()
