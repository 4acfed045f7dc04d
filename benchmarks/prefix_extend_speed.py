"""Times the prefix layer's decode-step extend on the GPU: ``prefix.FUSED_GEMMS`` on (``small_linear.py``: RMSNorm
and the epilogues inside the q/k/v and gate/up GEMMs, 7 launches) against off (the backbone's kernels around cuBLAS,
11), then a small sweep of ``small_linear``'s tile constants.

The shipped heads' layer shape (SmolLM2-135M: D = 576, 9 heads of 64, SwiGLU width 1152, the token input), bf16,
random weights (timing does not depend on them; o_proj and down_proj non-zero). One sequence with ``--cached``
entries, extended by ``--rows`` rows (the shipped tree's path: 5) at the same slots each call, the length held (the
count-0 form of ``extend``), so every call does the same work: ``BatchedPrefixCache._extend_fused`` as the step runs
it, less the inputs' launch (``kernels.path_inputs``), the token addmm out of place (its copy of the rows in both).
``--reps`` extends are captured in one CUDA graph; a round is one replay; a row's microseconds per extend are the
median over ``--rounds`` rounds (the gaps between launches included, as in the step's graph).

Each variant's outputs and written K/V slots are checked against the off branch (largest absolute difference; bf16:
the GEMMs' summation orders and the residual add in the o_proj addmm differ, so a few ulps of values of ~1-10).
``--parts`` also times the two fused kernels alone against the three launches each replaces.

Usage (GPU): python benchmarks/prefix_extend_speed.py [--rows 5,32] [--cached 300] [--full] [--parts]
Without a GPU: the same checks through Triton's interpreter (fp16 there: its bf16 rounds toward zero), no timings.
Then set the best row's values as the defaults in ``medusa_llama/decode/small_linear.py``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics

import torch

if not torch.cuda.is_available():  # a CPU smoke run (checks only): the kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from medusa_llama.decode import kernels, prefix, small_linear  # noqa: E402 -- after TRITON_INTERPRET
from medusa_llama.decode.decoder import StepRunner  # noqa: E402
from medusa_llama.decode.prefix import PrefixCache, PrefixLayer  # noqa: E402

D, HEADS, INTER, THETA = 576, 9, 1152, 100000.0
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float16
SWEEP = {  # one constant at a time from the defaults
    "QKV_BLOCK_N": (16, 32),
    "GATE_UP_BLOCK_N": (16, 32, 64),
    "BLOCK_K": (32, 64, 128),
    "NUM_WARPS": (1, 2, 4, 8),
    "NUM_STAGES": (1, 2, 3, 4),
    "DOT16": (False, True),
}
FULL = {  # --full: every combination of these (108), the other constants at their defaults
    "QKV_BLOCK_N": (16, 32),
    "GATE_UP_BLOCK_N": (16, 32, 64),
    "BLOCK_K": (64, 128),
    "NUM_WARPS": (2, 4, 8),
    "NUM_STAGES": (2, 3, 4),
}


def graph_us(fn, reps: int, rounds: int) -> float:
    """Median microseconds per call of ``fn`` over ``rounds`` replays of a CUDA graph of ``reps`` calls (the
    decoders' ``StepRunner``: warmed up, which compiles the kernels, then captured); nan on a CPU, after one call."""
    if DEV == "cpu":
        fn()
        return float("nan")
    runner = StepRunner(lambda: [fn() for _ in range(reps)], use_graph=True)
    runner.capture()
    runner()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        runner()
        end.record()
        torch.cuda.synchronize()
        times.append(1e3 * start.elapsed_time(end) / reps)
    return statistics.median(times)


class Setup:
    """The layer, its cache with ``cached`` entries, and one extend's inputs of ``rows`` rows."""

    def __init__(self, rows: int, cached: int):
        g = torch.Generator().manual_seed(0)
        layer = PrefixLayer(D, HEADS, INTER, THETA, token_input=True)
        for name, p in layer.named_parameters():  # every weight random: a trained layer's work, not the identity's
            noise = torch.randn(p.shape, generator=g)
            p.data = 1 + 0.1 * noise if name.endswith("norm.weight") else noise * p.shape[-1] ** -0.5
        self.layer = layer.to(DEV, DTYPE)
        self.cache = PrefixCache(self.layer, cached + rows + 16, torch.device(DEV), DTYPE, kernel=True, fused=True)
        hidden, emb = (torch.randn(cached + rows, D, generator=g).to(DEV, DTYPE) for _ in range(2))
        self.cache.extend(hidden[:cached], None, emb[:cached])  # the prefill (PyTorch ops)
        self.rows, self.emb = hidden[None, cached:], emb[None, cached:]  # (1, rows, D)
        self.slots = (cached + torch.arange(rows, device=DEV))[None]  # (1, rows)
        self.cos_sin = self.cache.rope_table.view(2, -1, self.layer.head_dim)[:, self.slots[0]]  # (2, rows, hd)
        self.at = slice(cached, cached + rows)

    def extend(self) -> torch.Tensor:
        c = self.cache
        return c._extend_fused(self.rows, self.emb, self.slots, self.cos_sin, c.lengths, scratch=False)

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """One extend's outputs and the K/V it wrote."""
        out = self.extend()
        return out, self.cache.k[0, self.at].clone(), self.cache.v[0, self.at].clone()


def max_diff(got: tuple[torch.Tensor, ...], ref) -> float:
    """The largest absolute difference of the tensors ``got`` from ``ref`` (tensors, or numbers)."""
    return max(float((a.float() - b).abs().max()) for a, b in zip(got, ref, strict=True))


def configs(full: bool) -> list[dict]:
    """The sweep's settings of ``small_linear``'s constants: the defaults first."""
    if full:
        return [dict(zip(FULL, values, strict=True)) for values in itertools.product(*FULL.values())]
    out = [{}]
    for name, values in SWEEP.items():
        out += [{name: v} for v in values if v != getattr(small_linear, name)]
    return out


def parts(setup: Setup, reps: int, rounds: int) -> None:
    """Each fused kernel alone against the three launches it replaces (the same inputs)."""
    layer, cache, rows = setup.layer, setup.cache, setup.rows.shape[1]
    x = setup.rows
    n1, n2 = layer.attn_norm, layer.mlp_norm
    cos, sin = setup.cos_sin
    flat = setup.slots.view(-1)
    k_flat, v_flat = (c.view(1, -1, HEADS, layer.head_dim) for c in (cache.k, cache.v))

    def qkv_three():
        h = kernels.add_rms_norm(x, None, n1.weight, n1.eps)[1]
        qkv = F.linear(h, cache._wqkv).view(1, rows, 3 * D)
        return kernels.rope_cache_write(qkv, cos[None], sin[None], flat, k_flat, v_flat, HEADS)

    def gate_up_three():
        return kernels.silu_mul(F.linear(kernels.add_rms_norm(x, None, n2.weight, n2.eps)[1], cache._w13))

    timings = {
        "rms_qkv_rope": lambda: small_linear.rms_qkv_rope(
            x, n1.weight, n1.eps, cache._wqkv, cos, sin, flat, cache.k, cache.v
        ),
        "  norm + F.linear + rope_cache_write": qkv_three,
        "rms_gate_up_silu": lambda: small_linear.rms_gate_up_silu(x, n2.weight, n2.eps, cache._w13),
        "  norm + F.linear + silu_mul": gate_up_three,
    }
    for name, fn in timings.items():
        print(f"  {name:40s} {graph_us(fn, reps, rounds):7.2f} us")


@torch.no_grad()
def main(args) -> None:
    defaults, knob = {name: getattr(small_linear, name) for name in SWEEP}, prefix.FUSED_GEMMS
    print(f"device: {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (interpreter: checks only)'}, {DTYPE}")
    print(f"defaults: {defaults}")
    for rows in args.rows:
        setup = Setup(rows, args.cached)
        print(f"\n## {rows} rows, {args.cached} cached: us per extend (median of {args.rounds} x {args.reps})")
        results = {}
        for gemms in (False, True):
            prefix.FUSED_GEMMS = gemms
            results[gemms] = setup.outputs()
            us, diff = graph_us(setup.extend, args.reps, args.rounds), max_diff(results[gemms], results[False])
            print(f"FUSED_GEMMS={gemms!s:5s}  {us:7.2f} us  max |diff| vs off {diff:.3g}")
        print(f"(largest |value| of the off branch's outputs and K/V: {max_diff(results[False], [0, 0, 0]):.3g})")
        if args.parts:
            parts(setup, args.reps, args.rounds)
        print("sweep (FUSED_GEMMS=True):")
        for config in configs(args.full):
            for name, value in {**defaults, **config}.items():
                setattr(small_linear, name, value)
            label = ", ".join(f"{k}={v}" for k, v in config.items()) or "defaults"
            us = graph_us(setup.extend, args.reps, args.rounds)
            print(f"  {label:60s} {us:7.2f} us  max |diff| vs off {max_diff(setup.outputs(), results[False]):.3g}")
        for name, value in defaults.items():
            setattr(small_linear, name, value)
    prefix.FUSED_GEMMS = knob


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[5], help="rows per extend")
    ap.add_argument("--cached", type=int, default=300, help="entries already cached")
    ap.add_argument("--reps", type=int, default=50, help="extends per CUDA graph (one round)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds (graph replays); the median is reported")
    ap.add_argument("--full", action="store_true", help="sweep every combination, not one constant at a time")
    ap.add_argument("--parts", action="store_true", help="also time the fused kernels alone against what they replace")
    main(ap.parse_args())
