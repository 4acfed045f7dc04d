"""Tile sweep of the split-K tree-attention kernel on a GPU: for each model shape and tree size, time every candidate
``KernelConfig`` (one verify step's attention calls, one per layer, in a CUDA graph, ``--cached`` tokens cached),
check it against SDPA, and keep the fastest. ``--write`` rewrites the ``TUNED`` table of ``attention.py``.

    python benchmarks/attention_sweep.py [--budget-s 200] [--write medusa_llama/decode/attention.py] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import time

import torch
import triton

from medusa_llama.decode.attention import KernelConfig, kernel_config, tree_attention, tree_attention_sdpa

# (name, layers, query heads, KV heads, head dim, tree size T), most important first
CASES = [
    ("llama7b", 32, 32, 32, 128, 64),
    ("smollm2", 30, 9, 3, 64, 128),
    ("smollm2", 30, 9, 3, 64, 1),
    ("smollm2", 30, 9, 3, 64, 64),
    ("llama7b", 32, 32, 32, 128, 1),
    ("smollm2", 30, 9, 3, 64, 16),
    ("smollm2", 30, 9, 3, 64, 4),
    ("smollm2", 30, 9, 3, 64, 32),  # 96 rows: the 128-row bucket (trees of 22-42 nodes)
    ("smollm2", 30, 9, 3, 64, 8),  # 24 rows: the 32-row bucket (6-10 nodes)
    ("smollm2", 30, 9, 3, 64, 2),  # 6 rows: the 8-row bucket
]


def candidates(rows: int, block_ms=(16, 32, 64), block_ns=(32, 64), splits=(1, 2, 4)) -> list[KernelConfig]:
    """The tiles swept for ``rows`` query rows: block_m up to the rows' power of two, 8 warps also for the big tiles."""
    top = max(16, 1 << (rows - 1).bit_length())
    out = []
    for bm, bn, bps in itertools.product(block_ms, block_ns, splits):
        if bm <= top and bm * bn <= 128 * 128:
            for warps in (4, 8) if bm * bn >= 64 * 64 else (4,):
                for merge_rows in (1, 4) if rows >= 16 else (1,):
                    out.append(KernelConfig(bm, bn, bps, warps, 3, merge_rows))
    return out


def time_config(q, caches, cache_len, mask, n_layers: int, config: KernelConfig, reps=20, rounds=3) -> float:
    def fn():
        for i in range(n_layers):
            tree_attention(q, caches[0, i], caches[1, i], cache_len, mask, config)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds + 1):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times[1:])


def write_table(path: str, best: dict[tuple[int, int], KernelConfig]) -> None:
    from medusa_llama.decode.attention import TUNED

    lines = ["TUNED: dict[tuple[int, int], KernelConfig] = {"]
    for (hd, rows), c in sorted({**TUNED, **best}.items()):  # cases not swept keep their entries
        lines.append(f"    ({hd}, {rows}): KernelConfig({c.block_m}, {c.block_n}, {c.blocks_per_split}, {c.num_warps}, "
                     f"{c.num_stages}{f', {c.merge_rows}' if c.merge_rows != 1 else ''}),")  # fmt: skip
    lines.append("}")
    text = open(path).read()
    table = "\n".join(lines) + "\n"
    new = re.sub(r"(# --- tuned: begin\n).*?(# --- tuned: end)", lambda m: m[1] + table + m[2], text, flags=re.S)
    open(path, "w").write(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cached", default="512", help="cached tokens; several (300,700,1500): the mean time is ranked")
    ap.add_argument("--only", default="", help="cases to sweep, as name:T (smollm2:64,llama7b:1); default all")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--budget-s", type=float, default=200, help="stop starting new cases after this many seconds")
    ap.add_argument("--write", default=None, help="attention.py whose TUNED table to rewrite")
    ap.add_argument("--out", default=None)
    ap.add_argument("--block-m", default="16,32,64", help="query-row tiles to sweep (a power of two >= 16 each)")
    ap.add_argument("--block-n", default="32,64", help="key tiles to sweep")
    ap.add_argument("--splits", default="1,2,4", help="key tiles per split to sweep")
    args = ap.parse_args()
    grid = {k: tuple(int(x) for x in getattr(args, k).split(",")) for k in ("block_m", "block_n", "splits")}
    t0 = time.perf_counter()
    results, best = [], {}
    lengths = [int(x) for x in str(args.cached).split(",")]
    for name, n_layers, nh, n_kv, hd, t in CASES:
        if args.only and f"{name}:{t}" not in args.only.split(","):
            continue
        if time.perf_counter() - t0 > args.budget_s:
            print("budget spent: remaining cases keep their defaults")
            break
        torch.manual_seed(0)
        rows = t * (nh // n_kv)
        caches = torch.randn(2, n_layers, 1, args.max_seq_len, n_kv, hd, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, t, nh, hd, device="cuda", dtype=torch.bfloat16)
        mask = ((torch.rand(t, t, device="cuda") < 0.3) | torch.eye(t, dtype=torch.bool, device="cuda")).tril()
        mask8 = mask.to(torch.int8)
        cache_lens = [torch.tensor(n, device="cuda") for n in lengths]
        k64, v64 = caches[0, 0].double(), caches[1, 0].double()
        refs = [tree_attention_sdpa(q.double(), k64, v64, n, mask) for n in cache_lens]

        def mean_ms(c: KernelConfig, q=q, caches=caches, mask8=mask8, n_layers=n_layers, lens=cache_lens) -> float:
            """The mean over the cache lengths: a decode's cache grows through them."""
            return statistics.mean(time_config(q, caches, n, mask8, n_layers, c) for n in lens)

        default = kernel_config(hd, rows)
        timed = []
        swept = candidates(rows, grid["block_m"], grid["block_n"], grid["splits"])
        for c in [default] + [c for c in swept if c != default]:
            if timed and time.perf_counter() - t0 > args.budget_s:
                break
            try:
                outs = [tree_attention(q, caches[0, 0], caches[1, 0], n, mask8, c).double() for n in cache_lens]
                err = max(float((o - ref).norm() / ref.norm()) for o, ref in zip(outs, refs, strict=True))
            except triton.runtime.errors.OutOfResources:  # tiles too big for the SM's shared memory: not a candidate
                continue
            timed.append((mean_ms(c) if err < 1.5e-2 else float("inf"), c, err))
        timed.sort(key=lambda x: x[0])
        ms, c, _ = timed[0]
        for stages in (1, 2):  # pipelining depth, on the best tiles only
            alt = KernelConfig(c.block_m, c.block_n, c.blocks_per_split, c.num_warps, stages, c.merge_rows)
            timed.append((mean_ms(alt), alt, 0.0))
        timed.sort(key=lambda x: x[0])
        best_ms, best_c, _ = timed[0]
        default_ms = next(m for m, cc, _ in timed if cc == default)
        wrong = [vars(cc) for m, cc, e in timed if e >= 1.5e-2]
        best[hd, 1 << (rows - 1).bit_length()] = best_c
        r = dict(case=f"{name} T={t}", rows=rows, default=vars(default), default_ms=round(default_ms, 4),
                 best=vars(best_c), best_ms=round(best_ms, 4), wrong=wrong,
                 all=[(round(m, 4), vars(cc)) for m, cc, _ in timed])  # fmt: skip
        results.append(r)
        print(f"{r['case']}: default {r['default_ms']} ms -> best {r['best_ms']} ms {r['best']}; wrong: {wrong}",
              flush=True)  # fmt: skip
        del caches, k64, v64
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.write:
        write_table(args.write, best)
        print("rewrote the TUNED table of", args.write)


if __name__ == "__main__":
    main()
