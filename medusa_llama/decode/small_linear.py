"""Triton "few rows" linears for the prefix layer's decode-step extend: an RMSNorm prologue, one weight-streaming
GEMM and the op that follows it as the epilogue, in one launch each.

A decode step extends the prefix layer (``prefix.py``) by its accepted path: 5 rows for the shipped tree, at most
``prefix.KERNEL_MAX_ROWS`` in batched decoding. At those sizes a GEMM streams its weights once (SmolLM2's layer in
bf16: 2.0 MB for q/k/v, 2.7 MB for gate/up) and does little else, and the small kernels around it cost about as much
(~1-1.5 us each on an H200, plus the graph's ~0.4 us gap per launch). These kernels fold the ops on either side of
the two input GEMMs into them:

- ``rms_qkv_rope``: RMSNorm, the concatenated q/k/v GEMM, rotary embedding of q and k (Su et al., 2021) and the
  K/V cache write; returns the rotated q (replaces ``kernels.add_rms_norm`` without its add, ``F.linear``,
  ``kernels.rope_cache_write``);
- ``rms_gate_up_silu``: RMSNorm, the concatenated gate/up GEMM and SwiGLU's ``silu(gate) * up`` (replaces
  ``kernels.add_rms_norm``, ``F.linear``, ``kernels.silu_mul``; the residual add before it goes into the o_proj GEMM
  as an in-place addmm, ``model.add_linear``).

Both are the same GEMM: M rows (padded to 16 for ``tl.dot``) times a weight's (N, K) rows, two (BLOCK_M, BLOCK_N)
fp32 accumulators a program, a K loop of ``BLOCK_K`` tiles that Triton's pipeliner prefetches (``NUM_STAGES``).
The two accumulators are what makes the epilogues shuffle-free: q/k/v heads (``rms_qkv_rope``) take a head's
columns d and d + hd/2 together, so ``rotate_half`` is ``lo cos - hi sin`` / ``hi cos + lo sin`` on the two tiles;
gate and up columns j (``rms_gate_up_silu``) come out side by side for their product.

Rounding: the same points as the kernels they replace, which are HF's (``prefix.BatchedPrefixCache._extend_fused``):
the RMSNorm normalises in fp32, rounds, then scales by its weight in the model dtype, so the GEMM reads the very
operands the unfused path feeds cuBLAS (up to the order the squares are summed in: one fp32 ulp of the scale); the
GEMM's output rounds to the model dtype, then rotary (fp32, rounded once) or SiLU (rounded) and the product (rounded).
That needs each row's scale before its first tile enters the GEMM, hence a first pass over the rows' K tiles for the
sums of squares: one more read of the few rows (6 KB for 5 rows in bf16, in L2 from the launch that wrote them),
about one L2 round trip before the weights start streaming. The one-pass alternative (the sums of squares and the
GEMM of ``x * g`` in the same loop, each row scaled at the end) saves that, but multiplies other operands than the
reference's (``x * g`` rounded for the MMA, the scale applied after the sums): a different result in bf16, which the
tests could only bound, where this one differs from the unfused path only by the GEMMs' summation order.

The tile constants below are read at each call (``benchmarks/prefix_extend_speed.py`` sweeps them on a GPU); on a
CPU the kernels run in Triton's interpreter (``tests/decode/test_small_linear.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

QKV_BLOCK_N = 16
"""Columns of each half of a head per ``rms_qkv_rope`` program (capped at hd / 2: SmolLM2's 15 q/k/v heads of 64 make
30 programs for 5 rows at 32, 60 at 16). On the H200 (``benchmarks/prefix_extend_speed.py``, 5 rows, 300 cached) the
extend took 25.9 us at 16 against 26.5 at 32 (results/gpu/issue8/session10/ab2/)."""
GATE_UP_BLOCK_N = 32
"""Gate (and as many up) columns per ``rms_gate_up_silu`` program (SwiGLU width 1152: 36 programs for 5 rows)."""
BLOCK_K = 64
"""The K tile of both kernels (D = 576: nine)."""
BLOCK_M_MAX = 64
"""The most rows a program takes (fewer rows pad to at least 16, ``tl.dot``'s least); more rows take more programs,
which read the weights again (from L2)."""
NUM_WARPS = 4
"""Warps per program, both kernels."""
NUM_STAGES = 3
"""Software-pipeline depth of the K loops (tiles in flight): 2 or more prefetches the next weight tile while the
current one is multiplied."""
DOT16 = True
"""16-bit operands (bf16 / fp16) multiplied as they are (the tensor cores' MMA, fp32 sums), as ``kernels.MIX_DOT16``.
Triton's interpreter keeps the fp32 form (its 16-bit ``tl.dot`` is not exact)."""
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _row_scales(X, m, m_ok, eps, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / RMS (fp32, (BLOCK_M,)) of rows ``m`` of X (M, D): the squares summed in fp32 over the K tiles (unrolled:
    no tile's load waits on another's sum)."""
    sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * D + k[None, :], mask=m_ok[:, None] & (k < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        sq += x * x
    return tl.math.rsqrt(tl.sum(sq, 1) / D + eps)


@triton.jit
def _two_dots(
    X,  # (M, D) the rows, contiguous
    G,  # (D,) the RMSNorm's weight
    W,  # (N, D) the weight (out, in), contiguous
    m,  # (BLOCK_M,) rows
    m_ok,
    scale,  # (BLOCK_M,) fp32: the rows' 1 / RMS
    cols_a,  # (BLOCK_N,) the weight rows of the first accumulator
    cols_b,  # (BLOCK_N,) and of the second
    n_ok,  # (BLOCK_N,) which of them exist
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT16: tl.constexpr,
):
    """RMSNorm(rows) @ W[cols_a].T and @ W[cols_b].T: two (BLOCK_M, BLOCK_N) fp32 accumulators.

    Each K tile of the rows is normalised as ``kernels.add_rms_norm`` does: times the scale in fp32, rounded to the
    rows' dtype, times the weight, rounded again: the unfused path's GEMM operand."""
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dt = X.dtype.element_ty
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        w_ok = k_ok[:, None] & n_ok[None, :]
        wa = tl.load(W + cols_a[None, :] * D + k[:, None], mask=w_ok, other=0.0)  # (BLOCK_K, BLOCK_N): W^T's tile
        wb = tl.load(W + cols_b[None, :] * D + k[:, None], mask=w_ok, other=0.0)
        x = tl.load(X + m[:, None] * D + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(G + k, mask=k_ok, other=0.0).to(tl.float32)
        h = (x.to(tl.float32) * scale[:, None]).to(dt)  # HF: normalise in fp32, round ...
        h = (g[None, :] * h.to(tl.float32)).to(dt)  # ... then scale in the model dtype
        if DOT16:  # 16-bit operands as they are, fp32 accumulation (a GPU's bf16 / fp16 MMA)
            acc_a += tl.dot(h, wa.to(dt))
            acc_b += tl.dot(h, wb.to(dt))
        else:  # fp32 operands: "ieee" for fp32 weights; 16-bit values are exact in tf32 (the interpreter's form)
            hf = h.to(tl.float32)
            acc_a += tl.dot(hf, wa.to(tl.float32), input_precision=PRECISION)
            acc_b += tl.dot(hf, wb.to(tl.float32), input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def _rms_qkv_rope_kernel(
    X,  # (M, D) the layer's input rows
    G,  # (D,) attn_norm's weight
    W,  # (3 NH HD, D) q, k, v weights stacked (out, in)
    Cos,  # (M, HD) each row's rotary tables
    Sin,
    Slots,  # (M,) int64: each row's slot in the caches seen as (slots, NH, HD)
    Q,  # (M, NH, HD) out: the rotated queries
    Kc,  # caches, written at Slots only
    Vc,
    M,
    eps,
    stride_slot,
    stride_head,
    D: tl.constexpr,
    NH: tl.constexpr,
    HD: tl.constexpr,
    HALF: tl.constexpr,  # HD // 2
    SPLITS: tl.constexpr,  # programs per head: cdiv(HALF, BLOCK_N)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT16: tl.constexpr,
):
    head = tl.program_id(0) // SPLITS  # 0 .. 3 NH - 1: the q heads, then k, then v
    c = (tl.program_id(0) % SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns d of the low half; d + HALF high
    c_ok = c < HALF
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    scale = _row_scales(X, m, m_ok, eps, D, BLOCK_M, BLOCK_K)
    rows = head * HD + c
    lo, hi = _two_dots(X, G, W, m, m_ok, scale, rows, rows + HALF, c_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT16)
    dt = Q.dtype.element_ty
    lo, hi = lo.to(dt), hi.to(dt)  # F.linear's output
    ok = m_ok[:, None] & c_ok[None, :]
    if head < 2 * NH:  # q or k: rotate_half(x) = (-hi, lo), in fp32, rounded once (as kernels.rope_cache_write)
        at = m[:, None] * HD + c[None, :]
        cos_lo = tl.load(Cos + at, mask=ok, other=0.0).to(tl.float32)
        cos_hi = tl.load(Cos + at + HALF, mask=ok, other=0.0).to(tl.float32)
        sin_lo = tl.load(Sin + at, mask=ok, other=0.0).to(tl.float32)
        sin_hi = tl.load(Sin + at + HALF, mask=ok, other=0.0).to(tl.float32)
        lo_f, hi_f = lo.to(tl.float32), hi.to(tl.float32)
        new_lo = (lo_f * cos_lo - hi_f * sin_lo).to(dt)
        new_hi = (hi_f * cos_hi + lo_f * sin_hi).to(dt)
        if head < NH:
            out = Q + m[:, None] * (NH * HD) + head * HD + c[None, :]
            tl.store(out, new_lo, mask=ok)
            tl.store(out + HALF, new_hi, mask=ok)
        else:
            slot = tl.load(Slots + m, mask=m_ok, other=0)
            out = Kc + slot[:, None] * stride_slot + (head - NH) * stride_head + c[None, :]
            tl.store(out, new_lo, mask=ok)
            tl.store(out + HALF, new_hi, mask=ok)
    else:  # v: into the cache as it is
        slot = tl.load(Slots + m, mask=m_ok, other=0)
        out = Vc + slot[:, None] * stride_slot + (head - 2 * NH) * stride_head + c[None, :]
        tl.store(out, lo, mask=ok)
        tl.store(out + HALF, hi, mask=ok)


@triton.jit
def _rms_gate_up_silu_kernel(
    X,  # (M, D) the rows (the residual stream after attention)
    G,  # (D,) mlp_norm's weight
    W,  # (2 INTER, D) gate then up weights (out, in)
    Out,  # (M, INTER) silu(gate) * up
    M,
    INTER,
    eps,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT16: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < INTER
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    scale = _row_scales(X, m, m_ok, eps, D, BLOCK_M, BLOCK_K)
    gate, up = _two_dots(X, G, W, m, m_ok, scale, n, n + INTER, n_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT16)
    dt = Out.dtype.element_ty
    gate = gate.to(dt).to(tl.float32)  # F.linear's output
    up = up.to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt)  # F.silu rounds to the model dtype ...
    ok = m_ok[:, None] & n_ok[None, :]
    tl.store(Out + m[:, None] * INTER + n[None, :], (act.to(tl.float32) * up).to(dt), mask=ok)  # ... then * up


def _tiles(rows: int, d: int, columns: int, block_n: int, dtype: torch.dtype) -> dict:
    """The launch's tile sizes and dot form for ``rows`` rows, K = ``d``, ``columns`` per accumulator."""
    return dict(
        BLOCK_M=min(BLOCK_M_MAX, max(16, triton.next_power_of_2(rows))),  # tl.dot needs 16 in every dimension
        BLOCK_N=min(block_n, max(16, triton.next_power_of_2(columns))),
        BLOCK_K=min(BLOCK_K, max(16, triton.next_power_of_2(d))),
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DOT16=DOT16 and dtype in (torch.bfloat16, torch.float16) and not _INTERPRETED,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )


@torch.library.custom_op("medusa_llama::rms_qkv_rope", mutates_args=("k_cache", "v_cache"))
def rms_qkv_rope(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """The attention's input side of an MHA layer over a few rows, one launch: ``h = RMSNorm(x) * norm_weight``,
    ``q, k, v = h @ weight.T`` split in heads, q and k rotated (``q cos + rotate_half(q) sin``), k and v written to
    the caches at ``slots``. Returns q (..., nh, hd).

    x (..., D), M rows; norm_weight (D,); weight (3 nh hd, D): the q, k and v weights stacked (out, in); cos, sin
    (M, hd) (any shape of M hd elements); slots (M,) long: each row's slot in the caches seen as one (slots, nh, hd)
    tensor (a (B, S, nh, hd) cache's sequence i at i S onwards); caches (..., nh, hd), of one dtype and strides, unit
    last stride; written there only. All in x's dtype."""
    d = x.shape[-1]
    nh, hd = k_cache.shape[-2:]
    if weight.shape != (3 * nh * hd, d) or hd % 2 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(f"rms_qkv_rope: weight {tuple(weight.shape)}, caches {tuple(k_cache.shape)}")
    x = x.contiguous()
    rows = x.numel() // d
    q = x.new_empty(*x.shape[:-1], nh, hd)
    stride_slot, stride_head = k_cache.view(-1, nh, hd).stride()[:2]  # one slot axis across the leading dims
    tiles = _tiles(rows, d, hd // 2, QKV_BLOCK_N, x.dtype)
    splits = triton.cdiv(hd // 2, tiles["BLOCK_N"])
    _rms_qkv_rope_kernel[(3 * nh * splits, triton.cdiv(rows, tiles["BLOCK_M"]))](
        x, norm_weight.contiguous(), weight.contiguous(), cos.contiguous(), sin.contiguous(), slots.contiguous(), q,
        k_cache, v_cache, rows, eps, stride_slot, stride_head,
        D=d, NH=nh, HD=hd, HALF=hd // 2, SPLITS=splits, **tiles,
    )  # fmt: skip
    return q


@rms_qkv_rope.register_fake
def _(x, norm_weight, eps, weight, cos, sin, slots, k_cache, v_cache):
    return x.new_empty(*x.shape[:-1], *k_cache.shape[-2:])


@torch.library.custom_op("medusa_llama::rms_gate_up_silu", mutates_args=())
def rms_gate_up_silu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """SwiGLU's input side over a few rows, one launch: ``h = RMSNorm(x) * norm_weight``, ``gate, up = h @
    weight.T``, returns ``silu(gate) * up`` (..., I). x (..., D); norm_weight (D,); weight (2 I, D): the gate
    weight, then the up weight (out, in). All in x's dtype."""
    d = x.shape[-1]
    inter = weight.shape[0] // 2
    if weight.shape != (2 * inter, d):
        raise ValueError(f"rms_gate_up_silu: weight {tuple(weight.shape)} for rows of {d}")
    x = x.contiguous()
    rows = x.numel() // d
    out = x.new_empty(*x.shape[:-1], inter)
    tiles = _tiles(rows, d, inter, GATE_UP_BLOCK_N, x.dtype)
    _rms_gate_up_silu_kernel[(triton.cdiv(inter, tiles["BLOCK_N"]), triton.cdiv(rows, tiles["BLOCK_M"]))](
        x, norm_weight.contiguous(), weight.contiguous(), out, rows, inter, eps, D=d, **tiles
    )
    return out


@rms_gate_up_silu.register_fake
def _(x, norm_weight, eps, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)
