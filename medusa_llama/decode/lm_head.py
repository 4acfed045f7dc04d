"""The LM head and the greedy argmax in one Triton launch: ``argmax_linear(hidden, weight)``.

A greedy step on the GPU path computed ``logits = lm_head(hidden)`` (cuBLAS: hidden (T, 576) x weight (49152, 576)^T,
16 us at T = 1, 18-19 us at T = 64 / 128 on an H200), wrote the (T, V) logits, and ``kernels.argmax_keys`` read them
back (1.5 us at T = 1, 6.3 at T = 64, 7.8 at T = 128) to reduce each row's column chunks to keys that
``kernels.greedy_token`` / ``kernels.greedy_accept`` reduce further. Here each GEMM program computes a
(BLOCK_M, BLOCK_N) tile of logits (fp32 accumulation over tiles of K), rounds it to the logits' dtype (the argmax
is the rounded logits' one, as on the unfused path: bf16 ties stay ties), reduces each row of the tile to one key and
merges it into the row's key: the logits are never written nor read back, and the argmax's launch becomes a fill of
T keys (below).

Design: one key a row, ``(..., 1)``, merged by an int64 ``tl.atomic_max`` (Triton lowers it to PTX ``atom.max.s64``;
its interpreter does it too). The alternative, one key per program's column chunk, ``(..., C)``: streaming the 56 MB
weight at the H200's bandwidth takes >= 132-264 programs, so C would be 200-400, while ``greedy_accept`` gathers
P x J x C keys in one program (C = 6 at T = 64 today): it would need a second reduction, i.e. a second launch or a
last-program merge behind an acquire-release counter (measured not to pay for the proposal's top-k,
``benchmarks/NOTES_speed.md``). With keys (..., 1), ``greedy_token`` / ``greedy_accept`` take them unchanged (C = 1),
and one atomic per row and program (384 programs at BLOCK_N = 128) is cheap next to the tile's GEMM.

The keys start as the dead key (``topk._DEAD``, below every real key): ``torch.full`` allocates them filled, one
small fill kernel before the GEMM in the step's graph. Resetting them in the consumer after it reads would spare that
launch, but it would put state across calls (a buffer that must be dead before the first call, and every call must
be followed by its consumer: graph captures, warm-up calls and the batched decoder's sharing of a backbone would each
have to keep that invariant); the fill keeps ``argmax_linear`` a pure function, safe in CUDA graphs and under
``torch.compile``.

Keys are ``kernels.argmax_keys``' (``topk._pack``): the value's order-preserving bits, then the lowest column of
equal values (-0.0 == +0.0); a NaN above every value, the first NaN winning (``torch.argmax``'s rule).

Numerics: fp32 accumulation; bf16 rounded to nearest even by integer ops (what a GPU's cast and PyTorch do; Triton's
interpreter casts toward zero, so the cast itself would make the CPU tests lie); fp16 by the cast (round to nearest
on both); fp32 logits unrounded, their product ``input_precision="ieee"`` (no tf32), as ``kernels.sequential_mix``.

``FUSED_ARGMAX`` switches ``Backbone.greedy_logits`` (the vanilla and Medusa greedy steps on the GPU path) to this
kernel; ``benchmarks/lm_head_speed.py`` times it against cuBLAS + ``argmax_keys`` over the tile knobs below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medusa_llama.decode.kernels import _INTERPRETED, _best_key
from medusa_llama.decode.topk import _DEAD

FUSED_ARGMAX = True
"""The greedy GPU steps of at least ``FUSED_MIN_ROWS`` rows take their argmax keys from ``argmax_linear`` (True) or
by ``argmax_keys`` from the LM head's logits (False: cuBLAS, then the argmax's launch). On the H200 (SmolLM2-135M's
49152 x 576 head, bf16, ``benchmarks/lm_head_speed.py``, results/gpu/issue8/session10/) the fused launch took 17.5,
17.4, 20.0 and 26.2 us at T = 4, 16, 64, 128 against 18.6, 19.3, 23.5 and 28.2 for cuBLAS + ``argmax_keys``, but
17.8-19.5 against 17.5 at T = 1; in the steps' graph replays it cut the tree16-128 Medusa steps by 0.4-1 %."""
FUSED_MIN_ROWS = 2
"""The fewest rows that take the fused launch: one row (the vanilla step) keeps cuBLAS's GEMV, faster there."""
FUSED_MAX_HIDDEN = 1024
"""The largest hidden size that takes the fused launch: it was measured at SmolLM2's 576 only; wider LM heads (a 7B's
4096, a K loop of 64 tiles) keep cuBLAS + ``argmax_keys`` until a GPU run shows the kernel pays there."""
BLOCK_N = 128
"""Vocabulary columns a program (49152 / 128: 384 programs, each reading 128 x 576 weights once)."""
BLOCK_N_MANY_ROWS = 64
"""Columns a program for more than 64 rows (128-row tiles): twice the programs (26.2 against 28.5 us at T = 128)."""
BLOCK_K = 64
"""The K tile (the hidden size, 576: 9 tiles)."""
BLOCK_M_MAX = 128
"""The most rows a program: T is padded to a power of two of at least 16 (``tl.dot``'s least), up to this; more rows
take more programs (each reading the weight tile again, from L2: programs of one column block run side by side)."""
NUM_STAGES = 3
"""Software-pipeline stages of the K loop (the weight tiles' loads in flight)."""
NUM_WARPS = 4
"""Warps a program of up to 64 rows; 128-row tiles take twice as many (their fp32 accumulator: 64 KB)."""


@triton.jit
def _round_bf16(x):
    """fp32 ``x`` rounded to bfloat16 (to nearest, ties to even), as fp32: the bits' upper half after adding half an
    ulp (+1 when the kept half is odd). Overflow rounds to inf, as the cast does; NaN stays NaN."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # -65536: 0xFFFF0000
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))


@triton.jit
def _argmax_linear_kernel(
    X,  # (M, K) hidden rows, row stride stride_x
    W,  # (N, K) the LM head's weight (out, in), contiguous
    Keys,  # (M,) int64, the dead key on entry: each row's best key after
    M,
    N,
    stride_x,
    K: tl.constexpr,  # the K loop's trip count (Triton's interpreter needs it constexpr)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT16: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # programs of one column block are neighbours (axis 0: rows), so a weight tile read for one is in L2 for the next
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # loads wrap past the ends (padding rows and columns read real ones: no masks in the loop); their results are
    # dropped below
    x_at = X + (rows % M)[:, None] * stride_x
    w_at = W + (cols % N).to(tl.int64)[:, None] * K  # int64: the weight may hold 2**31 elements or more
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if K % BLOCK_K == 0:
            x = tl.load(x_at + k[None, :])
            w = tl.load(w_at + k[None, :])  # (BLOCK_N, BLOCK_K)
        else:
            x = tl.load(x_at + k[None, :], mask=(k < K)[None, :], other=0.0)
            w = tl.load(w_at + k[None, :], mask=(k < K)[None, :], other=0.0)
        if DOT16:  # 16-bit operands as they are, fp32 accumulation (the tensor cores' bf16 / fp16 MMA)
            acc = tl.dot(x, tl.trans(w), acc)
        else:  # fp32 operands: exact products of 16-bit values under tf32; fp32 weights under "ieee"
            acc = tl.dot(x.to(tl.float32), tl.trans(w).to(tl.float32), acc, input_precision=PRECISION)
    dt: tl.constexpr = W.dtype.element_ty
    if dt == tl.bfloat16:
        v = _round_bf16(acc)
    elif dt == tl.float16:
        v = acc.to(tl.float16).to(tl.float32)
    else:
        v = acc
    live = (cols < N)[None, :]
    v = tl.where(live, v, float("-inf"))
    key = _best_key(v, cols[None, :], live, N, 1)  # each row's best of the tile
    tl.atomic_max(Keys + rows, key, mask=rows < M, sem="relaxed")  # order is irrelevant: the launch's end publishes


def _tiles(rows: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for ``rows`` rows, ``n`` columns and a hidden size ``k``."""
    block_m = min(BLOCK_M_MAX, max(16, triton.next_power_of_2(rows)))
    block_n = min(BLOCK_N if rows <= 64 else BLOCK_N_MANY_ROWS, max(16, triton.next_power_of_2(n)))
    block_k = min(BLOCK_K, max(16, triton.next_power_of_2(k)))
    return block_m, block_n, block_k, NUM_WARPS * (2 if block_m >= 128 else 1)


@torch.library.custom_op("medusa_llama::argmax_linear", mutates_args=())
def argmax_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The greedy argmax keys of ``F.linear(x, weight)`` in one GEMM launch (after the keys' fill), the logits never
    written: x (..., D), weight (V, D), of one dtype (float32 / bfloat16 / float16). Returns (..., 1) int64: each
    row's best key, equal to ``kernels.argmax_keys(F.linear(x, weight)).amax(-1, keepdim=True)`` where the two GEMMs'
    fp32 sums agree (their orders differ: a near-tie may fall the other way, as between two cuBLAS kernels).
    ``greedy_token`` and ``greedy_accept`` take it as ``argmax_keys``' output (C = 1); ``kernels.argmax_of`` gives
    the column."""
    d = x.shape[-1]
    n = weight.shape[0]
    if not d or weight.shape != (n, d) or weight.dtype != x.dtype:
        raise ValueError(f"argmax_linear: x (..., {d}) {x.dtype} against a weight {tuple(weight.shape)} {weight.dtype}")
    if not 0 < n < 2**31:
        raise ValueError(f"argmax over rows of {n} columns: 1 .. 2**31 - 1")
    rows = x.numel() // d
    keys = torch.full((*x.shape[:-1], 1), _DEAD.value, dtype=torch.long, device=x.device)
    if rows:
        x2 = x.reshape(rows, d)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        block_m, block_n, block_k, warps = _tiles(rows, n, d)
        _argmax_linear_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n))](
            x2, weight.contiguous(), keys, rows, n, x2.stride(0), d,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT16=x.dtype in (torch.bfloat16, torch.float16) and not _INTERPRETED,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=warps, num_stages=NUM_STAGES,
        )  # fmt: skip
    return keys


@argmax_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], 1, dtype=torch.long)
