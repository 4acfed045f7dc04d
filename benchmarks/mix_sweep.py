"""Times ``kernels.sequential_mix`` (one depth of the sequential heads' mix with its gathers) on the GPU, for its
tiles and its dot's operands (``MIX_DOT16``: 16-bit as they are, or widened to fp32 for a tf32 product).

The real shapes: SmolLM2-135M's D = 576, bf16, the rows and columns of each depth of the shipped tree
(``tree_cuda.json``); random weights (timing does not depend on them). Each depth's call is captured 50 times in a
CUDA graph and replayed, so a row's microseconds are a call's share of a replay (launch gaps included, as in the
step's graph). The PyTorch path (gathers, embedding, two ``addmm``, ``silu_residual``) is timed the same way for
scale. ``err``: the largest relative error of a config against the PyTorch path over the depths (bf16: a few ulps).

Usage (GPU): python benchmarks/mix_sweep.py [--tree PATH] [--quick]
Without a GPU it checks the errors of a few configs through Triton's interpreter (fp16 there: the interpreter's bf16
rounds toward zero), timing nothing.
Then set the best row's values as the defaults of ``MIX_DOT16``, ``MIX_BLOCK_N``, ``MIX_BLOCK_K`` and
``MIX_NUM_WARPS`` in ``medusa_llama/decode/kernels.py``. (A multiply-reduce form without the 16-row padding measured
78-171 us against 20.6 for the four depths: ``results/gpu/issue8/session8/final/mix_sweep.txt``; it was removed.)
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # a CPU smoke run (errors only, no timings): the kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from medusa_llama.decode import kernels  # noqa: E402 -- after TRITON_INTERPRET
from medusa_llama.decode.heads import SequentialBlock  # noqa: E402
from medusa_llama.decode.tree import build_tree, load_choices  # noqa: E402

HEADS = Path(__file__).resolve().parents[1] / "medusa_llama/assets/heads/smollm2-135m-instruct"
D, VOCAB, REPS = 576, 49152, 50
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float16
KNOBS = ("MIX_DOT16", "MIX_BLOCK_N", "MIX_BLOCK_K", "MIX_NUM_WARPS")


def graph_us(fn, reps: int = REPS, replays: int = 20) -> float:
    """Microseconds per call of ``fn``, as a share of replaying a CUDA graph of ``reps`` calls (nan on a CPU)."""
    if DEV == "cpu":
        return float("nan")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, 1e3 * start.elapsed_time(end) / (replays * reps))
    return best


def depth_inputs(tree, gen: torch.Generator) -> list[tuple]:
    """Per depth: (states (1, S, D), rows, tokens (1, C), columns), the shapes the proposal gives the kernel."""
    out, s_rows, cols = [], 1, 1
    for d in range(tree.max_depth):
        rows, columns = tree.expander_rows[d].to(DEV), tree.expander_columns[d].to(DEV)
        states = torch.randn(1, s_rows, D, generator=gen).to(DEV, DTYPE)
        tokens = torch.randint(0, VOCAB, (1, cols), generator=gen).to(DEV)
        out.append((states, rows, tokens, columns))
        s_rows, cols = rows.numel(), rows.numel() * tree.level_topk[d]
    return out


def configs(quick: bool) -> list[dict]:
    out = [dict(MIX_DOT16=d16, MIX_BLOCK_N=n, MIX_BLOCK_K=k, MIX_NUM_WARPS=w) for d16, n, k, w in
           itertools.product((True, False), (16, 32, 64), (32, 64, 128), (2, 4))]  # fmt: skip
    return [c for c in out if c["MIX_NUM_WARPS"] == 4 and c["MIX_BLOCK_K"] == 64] if quick else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=str(HEADS / "tree_cuda.json"))
    ap.add_argument("--quick", action="store_true", help="fewer configs (block sizes at the default K tile)")
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name() if DEV == "cuda" else "CPU (errors only, no timings)")
    gen = torch.Generator().manual_seed(0)
    choices = load_choices(args.tree)
    tree = build_tree(choices, max((len(c) for c in choices), default=1))
    inputs = depth_inputs(tree, gen)
    table = torch.randn(VOCAB, D, generator=gen).to(DEV, DTYPE)
    block = SequentialBlock(D)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=gen) * D**-0.5
    block = block.to(DEV, DTYPE).eval()
    lin, tok = block.state, block.token
    print(f"D={D}, depths' (parent rows, output rows): {[(s.shape[1], r.numel()) for s, r, _, _ in inputs]}")

    def torch_path(states, rows, tokens, columns):
        emb = torch.nn.functional.embedding(tokens.index_select(1, columns), table)
        return block(states.index_select(1, rows), emb)

    def mix(states, rows, tokens, columns):
        return kernels.sequential_mix(states, rows, tokens, columns, table, lin.weight, lin.bias, tok.weight)

    with torch.no_grad():
        refs = [torch_path(*x) for x in inputs]
        ref_us = [graph_us(lambda x=x: torch_path(*x)) for x in inputs]
        saved = {k: getattr(kernels, k) for k in KNOBS}
        names = [f"d{d}" for d in range(len(inputs))]
        print(f"\n{'form':6s} {'N':>3s} {'K':>4s} {'w':>2s} " + " ".join(f"{n:>6s}" for n in names)
              + f" {'sum us':>7s} {'err':>8s}")  # fmt: skip
        print(f"{'torch':16s} " + " ".join(f"{t:6.2f}" for t in ref_us) + f" {sum(ref_us):7.2f}")
        rows_out = []
        todo = configs(args.quick) if DEV == "cuda" else configs(True)[::2]
        for cfg in [dict(saved, _default=True)] + todo:
            for k in KNOBS:
                setattr(kernels, k, cfg.get(k, saved[k]))
            try:
                err = max(float(((mix(*x).float() - r.float()).abs().max()) / r.float().abs().max())
                          for x, r in zip(inputs, refs, strict=True))  # fmt: skip
                times = [graph_us(lambda x=x: mix(*x)) for x in inputs]
            except Exception as e:  # noqa: BLE001 -- a tile Triton cannot build: report it and go on
                print(f"{cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            form = "dot16" if kernels.MIX_DOT16 else "dot"
            line = (f"{form:6s} {kernels.MIX_BLOCK_N:3d} {kernels.MIX_BLOCK_K:4d} {kernels.MIX_NUM_WARPS:2d} "
                    + " ".join(f"{t:6.2f}" for t in times) + f" {sum(times):7.2f} {err:8.1e}"
                    + ("  (current default)" if cfg.get("_default") else ""))  # fmt: skip
            print(line, flush=True)
            rows_out.append((sum(times), line))
        for k, v in saved.items():
            setattr(kernels, k, v)
    print("\nbest five:")
    for _, line in sorted(rows_out)[:5]:
        print(line)


if __name__ == "__main__":
    main()
