"""Times the greedy step's LM head and argmax on the GPU: cuBLAS ``F.linear`` then ``kernels.argmax_keys`` (the
unfused path) against ``lm_head.argmax_linear`` (the GEMM and the argmax in one launch, after the keys' fill), over a
grid of its tile knobs, for T = 1, 4, 16, 64, 128 rows.

The real shapes: SmolLM2-135M's hidden size 576 and vocabulary 49152, bf16; random weights (timing does not depend on
them: hidden rows N(0, 1) as after the final RMSNorm, weights N(0, 0.02**2), so the logits' spread and their near
ties are an LM head's). Each variant is captured in one CUDA graph of ``--rep-ms`` of calls, launch gaps included as
in the step's graph (``triton.testing.do_bench_cudagraph``); a call's time is the median replay's. The weight (56 MB)
is about the H200's L2 (50 MB), so back-to-back calls find little of it there; ``--flush`` writes 256 MB between
calls (that write's own time, measured alone, subtracted), for the cold L2 of a decode step, where the verify
forward runs in between.

Agreement: each config's argmax (``kernels.argmax_of``) against ``torch.argmax(F.linear(h, w))`` on ``--check-rows``
random rows (and the timed ones). The two GEMMs sum in different orders, so a near tie may fall the other way: a
mismatch is counted, and called a near tie where cuBLAS's two bf16 logits are within one bf16 ulp of each other.

Usage (GPU): python benchmarks/lm_head_speed.py [--quick] [--flush] [--rows 1,4,16,64,128]
Then set the best row's values as the defaults of ``BLOCK_N``, ``BLOCK_K``, ``BLOCK_M_MAX``, ``NUM_STAGES`` and
``NUM_WARPS`` in ``medusa_llama/decode/lm_head.py``, and A/B the step: ``benchmarks/step_profile.py --steps-only
--set lm_head.FUSED_ARGMAX=True``. Without a GPU it checks the agreement of a few configs at small shapes through
Triton's interpreter, timing nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # a CPU smoke run (agreement only, no timings): the kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.testing  # noqa: E402 -- after TRITON_INTERPRET, as every import of Triton

from medusa_llama.decode import lm_head  # noqa: E402
from medusa_llama.decode.kernels import argmax_keys, argmax_of  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D, VOCAB = (576, 49152) if DEV == "cuda" else (64, 1000)
KNOBS = ("BLOCK_N", "BLOCK_K", "BLOCK_M_MAX", "NUM_STAGES", "NUM_WARPS")


def graph_us(fn, rep_ms: float) -> float:
    """Microseconds per call of ``fn`` (nan on a CPU): ``triton.testing.do_bench_cudagraph`` captures about ``rep_ms``
    of calls in one CUDA graph (after a warm-up call that compiles the kernels) and replays it 10 times; the median
    replay / its calls."""
    if DEV == "cpu":
        return float("nan")
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def configs(quick: bool) -> list[dict]:
    grid = itertools.product((64, 128, 256), (64, 128), (64, 128), (3, 4), (4, 8))
    out = [dict(zip(KNOBS, values, strict=True)) for values in grid]
    if quick:
        out = [c for c in out if c["BLOCK_K"] == 64 and c["BLOCK_M_MAX"] == 128]
    return out if DEV == "cuda" else [c for c in out if c["NUM_STAGES"] == 3 and c["NUM_WARPS"] == 4][::2]


def disagreement(h: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int]:
    """(argmax mismatches, of them near ties, rows whose key differs from ``argmax_keys`` of cuBLAS's logits)."""
    logits = F.linear(h, w)
    ref = logits.float().argmax(-1)
    keys = lm_head.argmax_linear(h, w)
    got = argmax_of(keys)
    bad = (got != ref).nonzero().flatten().tolist()
    near = 0
    for r in bad:
        a, b = float(logits[r, ref[r]]), float(logits[r, got[r]])
        near += abs(a - b) <= torch.finfo(logits.dtype).eps * max(abs(a), abs(b))
    key_diff = int((keys != argmax_keys(logits).amax(-1, keepdim=True)).sum())
    return len(bad), near, key_diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,16,64,128", help="the T values (rows of hidden states)")
    ap.add_argument("--quick", action="store_true", help="fewer configs (K tile 64, up to 128 rows a program)")
    ap.add_argument("--flush", action="store_true", help="write 256 MB between calls: a cold L2, as in a step")
    ap.add_argument("--rep-ms", type=float, default=20.0, help="milliseconds of calls in a CUDA graph")
    ap.add_argument("--check-rows", type=int, default=1024, help="random rows the argmaxes are compared on")
    args = ap.parse_args()
    rows = [int(t) for t in args.rows.split(",")]
    dtype = torch.bfloat16
    print(torch.__version__, torch.cuda.get_device_name() if DEV == "cuda" else "CPU (agreement only, no timings)")
    print(f"hidden {D}, vocab {VOCAB}, {dtype}, {args.rep_ms} ms of calls a graph, median of 10 replays"
          + (", L2 flushed between calls" if args.flush else ""))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(VOCAB, D, generator=gen) * 0.02).to(DEV, dtype)
    hs = {t: torch.randn(t, D, generator=gen).to(DEV, dtype) for t in rows}
    check = torch.randn(args.check_rows if DEV == "cuda" else 33, D, generator=gen).to(DEV, dtype)
    scratch = torch.empty(64 * 2**20, dtype=torch.float32, device=DEV) if args.flush else None

    def timed(fn) -> float:
        if scratch is None:
            return graph_us(fn, args.rep_ms)
        return graph_us(lambda: (scratch.zero_(), fn()), args.rep_ms) - graph_us(scratch.zero_, args.rep_ms)

    with torch.no_grad():
        print("\nunfused (cuBLAS F.linear, then argmax_keys), and the fused kernel's keys fill alone:")
        base = {}
        for t, h in hs.items():
            base[t] = timed(lambda h=h: argmax_keys(F.linear(h, w)))
            lin = timed(lambda h=h: F.linear(h, w))
            fill = timed(lambda t=t: torch.full((t, 1), -(2**63), dtype=torch.long, device=DEV))
            print(f"T={t:4d}: linear + argmax_keys {base[t]:7.2f} us (linear {lin:6.2f}); fill {fill:5.2f} us")
        saved = {k: getattr(lm_head, k) for k in KNOBS}
        header = " ".join(f"{k:>5s}" for k in ("N", "K", "M", "st", "w")) + "".join(f" {f'T={t}':>8s}" for t in rows)
        print(f"\nfused: us a call by T; 'mism' = argmax mismatches against cuBLAS over {check.shape[0]} + the timed "
              "rows (near ties), 'keys' = rows whose key differs\n" + header + "   mism  keys")  # fmt: skip
        results = []
        for cfg in [dict(saved, _default=True)] + configs(args.quick):
            for k in KNOBS:
                setattr(lm_head, k, cfg[k])
            try:
                times = [timed(lambda h=h: lm_head.argmax_linear(h, w)) for h in hs.values()]
                mism = [disagreement(h, w) for h in [check, *hs.values()]]
            except Exception as e:  # noqa: BLE001 -- a tile Triton cannot build (shared memory): report it, go on
                print(f"{cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            bad, near, keys = (sum(m[i] for m in mism) for i in range(3))
            line = " ".join(f"{cfg[k]:5d}" for k in KNOBS) + "".join(f" {x:8.2f}" for x in times)
            line += f" {bad:3d} ({near}) {keys:4d}" + ("  (current default)" if cfg.get("_default") else "")
            print(line, flush=True)
            results.append((times, line))
        for k, v in saved.items():
            setattr(lm_head, k, v)
    if DEV == "cpu" or not results:
        return
    print("\nper T: unfused / the first row (the default) / the best config")
    for i, t in enumerate(rows):
        best_times, best_line = min(results, key=lambda r: r[0][i])
        print(f"T={t:4d}: {base[t]:7.2f} / {results[0][0][i]:7.2f} / {best_times[i]:7.2f} us  [{best_line[:29]}]")
    print("\nbest five by the sum over T:")
    for _, line in sorted(results, key=lambda r: sum(r[0]))[:5]:
        print(line)


if __name__ == "__main__":
    main()
