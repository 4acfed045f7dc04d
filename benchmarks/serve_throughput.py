"""Throughput with the server in front (issue 10, item 4): N concurrent streaming clients against ``medusa-llama
serve``'s engine, batched Medusa (the tree the server picks for that batch size) against batched vanilla; and the
server's overhead at one client (streamed tokens/s through HTTP against ``decoder.generate``'s, target >= 90%).

The real app runs under uvicorn on a free loopback port in this process (its own threads); the clients are one
asyncio event loop of httpx streams. The server's batch size is the concurrency. Prints a table and writes JSON:

    python benchmarks/serve_throughput.py --concurrency 1,8,32 --prompts 16 --max-new-tokens 256 --out s.json
"""

from __future__ import annotations

import argparse
import time

from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.eval.prompts import chat_ids, load_prompts
from medusa_llama.pipeline import DecoderOptions, device_name, load_pipeline, resolve_heads_dir
from medusa_llama.serve.bench import measure_serve_overhead, measure_server_throughput, write_report
from medusa_llama.serve.config import ServeConfig
from medusa_llama.serve.engine import BatchedEngine
from medusa_llama.serve.trees import serve_tree, table_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (= server batch sizes)")
    ap.add_argument("--prompts", type=int, default=16, help="requests per level (at least 2 per client are sent)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--tree-table", default=None, help="the server's trees per batch size (default: beside the heads)")
    ap.add_argument("--overhead-prompts", type=int, default=4, help="prompts of the one-client overhead (0: skip)")
    ap.add_argument("--prompt-file", default=None, help="a JSONL prompt file (default: the built-in held-out prompts)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    t_start = time.perf_counter()

    opts = DecoderOptions(device=args.device, dtype=args.dtype, backend="fast", max_seq_len=args.max_seq_len)
    pipe = load_pipeline(opts, need_heads=True)
    bb = pipe.backbone
    table = args.tree_table or table_path(resolve_heads_dir(None, None))
    held_out = [chat_ids(bb.tokenizer, p.text) for p in load_prompts(args.prompt_file)]
    print(f"{device_name(bb.device)} {bb.dtype}: tree table {table}", flush=True)

    rows = []
    for c in levels:
        prompts = [held_out[i % len(held_out)] for i in range(max(args.prompts, 2 * c))]
        heads, tree = serve_tree(pipe, ServeConfig(batch_size=c, tree_table=str(table) if table else None))
        row = {"concurrency": c, "requests": len(prompts), "tree_size": tree.size if heads is not None else 1}
        for kind, (h, t) in (("medusa", (heads, tree)), ("vanilla", (None, None))):
            try:
                engine = BatchedEngine(BatchedDecoder(bb, c, h, t))
                r = measure_server_throughput(engine, prompts, c, args.max_new_tokens)
            except Exception as exc:  # one failing level must not end the run
                row[kind] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"clients={c:3d}  {kind:8s} FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            row[kind] = {"tokens_per_s": r.tokens_per_s, "tokens": r.tokens, "mean_accepted_tokens": r.mean_accepted}
            print(
                f"clients={c:3d}  {kind:8s} {r.tokens_per_s:9.1f} tok/s  accepted/step {r.mean_accepted:.2f}  "
                f"({r.tokens} tokens, tree {row['tree_size'] if kind == 'medusa' else 1} nodes, "
                f"{time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )
        if "tokens_per_s" in row.get("medusa", {}) and "tokens_per_s" in row.get("vanilla", {}):
            row["speedup"] = row["medusa"]["tokens_per_s"] / row["vanilla"]["tokens_per_s"]
            print(f"clients={c:3d}  speedup {row['speedup']:.2f}x", flush=True)
        rows.append(row)

    overhead = None
    if args.overhead_prompts:
        try:
            m = measure_serve_overhead(pipe.decoder, held_out[: args.overhead_prompts], args.max_new_tokens, repeats=1)
            overhead = {"generate_tokens_per_s": m.generate_tokens_per_s, "server_tokens_per_s": m.server_tokens_per_s}
            overhead.update(ratio=m.ratio, tokens=m.tokens, tree_size=pipe.tree.size)
            print(
                f"one client: generate {m.generate_tokens_per_s:.1f} tok/s, server {m.server_tokens_per_s:.1f} tok/s, "
                f"ratio {m.ratio:.3f} (target >= 0.90)",
                flush=True,
            )
        except Exception as exc:
            overhead = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"one-client overhead FAILED {type(exc).__name__}: {exc}", flush=True)

    write_report(
        args.out,
        bb,
        time.perf_counter() - t_start,
        tree_table=str(table) if table else None,
        max_new_tokens=args.max_new_tokens,
        rows=rows,
        one_client_overhead=overhead,
    )


if __name__ == "__main__":
    main()
