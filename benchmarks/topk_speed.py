"""``torch.topk`` vs the Triton ``topk_indices`` (``decode/topk.py``) on the Medusa proposal's shapes: microseconds
per call, each timed as CUDA-graph replays of ``--calls`` calls on one input, and the results checked.

    python benchmarks/topk_speed.py                      # GPU: rows 1 4 16 x N 8192 49152 x k 1 5 10, bf16
    python benchmarks/topk_speed.py --chunks 1024 16384  # other chunk sizes (columns per program) than 2048 4096
    python benchmarks/topk_speed.py --device cpu         # smoke test: the kernels in Triton's interpreter

Besides the default chunk (``topk.CHUNK``, or ``topk.SPLIT_CHUNK`` where that rule applies: column "ours") it
times the kernels with chunks of 2048 and 4096 columns unless ``--chunks`` says otherwise. Checks, on logits-like
values (``randn * 3`` rounded to the dtype, so the top often holds ties): the values at the returned columns equal
``torch.topk``'s values exactly, and the columns equal a stable descending sort's (equal values lowest column first).
Exits 1 on any mismatch. On a CPU the timings are the interpreter's, not meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--rows", type=int, nargs="+", default=None, help="default: 1 4 16 (cpu: 1 3)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="N; default: 8192 49152 (cpu: 100 8192 8193)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    p.add_argument("--chunks", type=int, nargs="*", default=[2048, 4096], help="also these chunk sizes (powers of 2)")
    p.add_argument("--calls", type=int, default=100, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=20, help="graph replays timed")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args()
    cpu = args.device == "cpu"
    args.rows = args.rows or ([1, 3] if cpu else [1, 4, 16])
    args.sizes = args.sizes or ([100, 8192, 8193] if cpu else [8192, 49152])
    if cpu:
        args.calls, args.reps = min(args.calls, 2), min(args.reps, 1)
    return args


def time_us(fn: Callable, x, calls: int, reps: int) -> float:
    """Microseconds per call: on CUDA, replays of a graph of ``calls`` calls; on a CPU, plain wall time."""
    import torch

    if not x.is_cuda:
        fn(x)
        t0 = time.perf_counter()
        for _ in range(reps * calls):
            fn(x)
        return (time.perf_counter() - t0) / (reps * calls) * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) outside the capture
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * calls) * 1e3


def mismatch(x, idx, k: int) -> str:
    """'' when idx is right for x, else what is wrong."""
    import torch

    if idx.shape != (*x.shape[:-1], k) or idx.dtype != torch.long:
        return f"shape/dtype {tuple(idx.shape)} {idx.dtype}"
    if not torch.equal(x.gather(-1, idx), x.topk(k, dim=-1).values):
        return "values"
    if not torch.equal(idx, torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]):
        return "tie order"
    return ""


def main() -> int:
    args = parse()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton reads it when first imported: below
    import torch

    from medusa_llama.decode import topk

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu for the interpreter smoke test)")
    if topk.triton is None:
        sys.exit("Triton is not installed")
    ours: dict[str, Callable] = {
        # CUDA: the public function (the custom op); CPU: the kernels themselves (topk_indices would be torch.topk)
        "ours": (lambda x, k: topk.topk_indices(x, k)) if args.device == "cuda" else topk.triton_topk_indices,
    }
    for c in args.chunks:
        ours[f"chunk {c}"] = lambda x, k, c=c: topk.triton_topk_indices(x, k, chunk=c)
    names = list(ours)
    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (Triton interpreter)'}; "
          f"us per call; default chunk {topk.CHUNK}")  # fmt: skip
    head = f"{'dtype':>5} {'rows':>4} {'N':>6} {'k':>3} {'torch.topk':>10} " + " ".join(f"{n:>10}" for n in names)
    print(head + "  speedup  check")
    table, failures = [], 0
    for dtype in args.dtypes:
        for rows in args.rows:
            for n in args.sizes:
                torch.manual_seed(rows * 100_000 + n)
                x = (torch.randn(rows, n, device=args.device) * 3).to(getattr(torch, DTYPES[dtype]))
                for k in args.ks:
                    if k > n:
                        continue
                    row = {"dtype": dtype, "rows": rows, "N": n, "k": k}
                    row["torch.topk"] = time_us(lambda x, k=k: x.topk(k, dim=-1), x, args.calls, args.reps)
                    errors = []
                    for name, fn in ours.items():
                        bad = mismatch(x, fn(x, k), k)
                        errors += [f"{name}: {bad}"] if bad else []
                        row[name] = time_us(lambda x, fn=fn, k=k: fn(x, k), x, args.calls, args.reps)
                    row["check"] = "; ".join(errors) or "ok"
                    failures += bool(errors)
                    table.append(row)
                    times = " ".join(f"{row[c]:10.2f}" for c in ["torch.topk", *names])
                    print(f"{dtype:>5} {rows:4d} {n:6d} {k:3d} {times} {row['torch.topk'] / row['ours']:7.1f}x  "
                          f"{row['check']}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
    print(f"{failures} mismatching shape(s) of {len(table)}" if failures else f"all {len(table)} shapes match")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
