"""Top-k column indices of small logits tensors by Triton: ``torch.topk``'s job for the Medusa proposal's shapes.

The proposal ranks a few rows (1..16) of 8192 (draft vocabulary) or 49152 (full vocabulary) logits for k = 1..10
every step. ``torch.topk`` spends ~34 us on that on an H200 (a radix select built for large k and long rows, then a
bitonic sort of the k results); this does it in a few microseconds, in one or two launches.

Algorithm. Each value is packed with its column into one int64 *key* that orders as (value, -column): the fp32
bits mapped to an order-preserving signed int32 in the high word, ``2**31 - 1 - column`` (``column ^ 0x7FFFFFFF``)
in the low word. Keys are unique, the largest key is the largest value at its lowest column (ties resolve lowest
index first), and the column comes back from the low word. Dead slots (past the row's end, or already taken) hold
the smallest int64.

1. One program per (row, chunk of up to ``CHUNK`` columns) loads the chunk into registers as keys and takes k rounds
   of "max, then kill that key": its top k, best first, one reduction per round.
2. A single chunk (N <= ``CHUNK``) writes the columns straight out. Otherwise stage 1 writes its k keys per chunk
   and a second kernel, one program per row, takes the same k rounds over the (chunks * k) candidates.

No host syncs and fixed launch shapes for fixed input shapes: safe to capture in a CUDA graph (after one warm-up
call has compiled the kernels). ``topk_indices`` falls back to ``torch.topk`` off CUDA or without Triton.
"""

from __future__ import annotations

import torch

try:  # the GPU path's kernels; the CPU path needs no Triton
    import triton
    import triton.language as tl

    _jit, _constexpr = triton.jit, tl.constexpr
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

    def _jit(fn):  # the kernels are never launched then (annotations stay strings: ``from __future__``)
        return fn

    def _constexpr(v):
        return v


CHUNK = 8192  # columns per stage-1 program: N = 8192 (the draft vocabulary) takes one launch
SPLIT_CHUNK = 512
"""Columns per stage-1 program for k >= ``SPLIT_MIN_K`` and N <= ``CHUNK``: k rounds over 512 columns in each of
many programs, then a merge launch, beat k rounds over the whole row in one program (H200, N = 8192, bf16, the
shipped tree's depths: k 9, 7, 4: 8.2, 6.7, 4.4 -> 5.7, 4.7, 3.7 us; k 2: 2.8 -> 3.0, so small k stays one pass;
``benchmarks/topk_speed.py --chunks``, results/gpu/issue8/session9/topk_chunks.txt)."""
SPLIT_MIN_K = 3
_DEAD = _constexpr(-(2**63))  # the key of a dead slot: below every real key
_LOW = _constexpr(2**31 - 1)  # low word = column ^ _LOW = _LOW - column: lower column of two equal values, larger key


@_jit
def _pack(x, cols):
    """The int64 keys of fp32 values ``x`` at columns ``cols`` (tensors or scalars)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 equals +0.0: one key, so that the tie goes to the lower column
    b = x.to(tl.int32, bitcast=True)
    ordered = b ^ ((b >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits, so int order = float order
    return (ordered.to(tl.int64) << 32) | (cols ^ _LOW).to(tl.int64)


@_jit
def _keys(X, stride_row, row, cols, N):
    """The int64 keys of ``X[row, cols]``; dead past N."""
    x = tl.load(X + row * stride_row + cols, mask=cols < N, other=0.0).to(tl.float32)
    return tl.where(cols < N, _pack(x, cols), _DEAD)


@_jit
def _chunk_topk_kernel(
    X,
    Out,
    N,
    stride_row,
    num_chunks,
    inner,
    stride_outer,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE_KEYS: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    keys = _keys(X, stride_row, row, cols, N)
    if WRITE_KEYS:  # the candidates' buffer
        out = Out + (row * num_chunks + chunk) * K
    else:  # row = outer * inner + j: its k columns at outer * stride_outer + j * K (contiguous: stride_outer = inner K)
        out = Out + (row // inner) * stride_outer + (row % inner) * K
    for i in tl.static_range(K):
        best = tl.max(keys, 0)
        keys = tl.where(keys == best, _DEAD, keys)
        if WRITE_KEYS:
            tl.store(out + i, best)
        else:
            tl.store(out + i, (best & _LOW) ^ _LOW)


@_jit
def _merge_kernel(Keys, Out, C, inner, stride_outer, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    keys = tl.load(Keys + row * C + c, mask=c < C, other=_DEAD)
    out = Out + (row // inner) * stride_outer + (row % inner) * K
    for i in tl.static_range(K):
        best = tl.max(keys, 0)
        keys = tl.where(keys == best, _DEAD, keys)
        tl.store(out + i, (best & _LOW) ^ _LOW)


def triton_topk_indices(
    x: torch.Tensor, k: int, chunk: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton path of ``topk_indices`` on any device Triton runs on (its interpreter too); ``chunk``: columns
    per stage-1 program, a power of two (default: ``SPLIT_CHUNK`` for rows of at most ``CHUNK`` columns and
    k >= ``SPLIT_MIN_K``, else ``CHUNK``). ``out``: where to write, as ``_out_layout`` allows (a slice of a wider
    buffer; default a new tensor)."""
    n = x.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} must be within 0..{n} (the row length)")
    if n >= 2**31:
        raise ValueError(f"rows of {n} columns: at most 2**31 - 1")
    rows = x.numel() // n if n else 0
    if out is None:
        out = torch.empty(*x.shape[:-1], k, dtype=torch.long, device=x.device)
    inner, stride_outer = _out_layout(out, k)
    if rows == 0 or k == 0:
        return out
    if chunk is None:
        chunk = SPLIT_CHUNK if k >= SPLIT_MIN_K and n <= CHUNK else CHUNK
    x2 = x.reshape(rows, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block = min(chunk, max(16, triton.next_power_of_2(n)))
    num_chunks = triton.cdiv(n, block)
    warps = max(1, min(16, block // 512))
    if num_chunks == 1:
        _chunk_topk_kernel[(rows, 1)](
            x2, out, n, x2.stride(0), 1, inner, stride_outer, K=k, BLOCK=block, WRITE_KEYS=False, num_warps=warps
        )
        return out
    cand = torch.empty(rows, num_chunks * k, dtype=torch.long, device=x.device)
    _chunk_topk_kernel[(rows, num_chunks)](
        x2, cand, n, x2.stride(0), num_chunks, 1, k, K=k, BLOCK=block, WRITE_KEYS=True, num_warps=warps
    )
    c = num_chunks * k
    _merge_kernel[(rows,)](
        cand, out, c, inner, stride_outer, K=k, BLOCK=max(16, triton.next_power_of_2(c)), num_warps=1 if c <= 256 else 4
    )
    return out


def _out_layout(out: torch.Tensor, k: int) -> tuple[int, int]:
    """(inner, stride_outer) of an ``out`` (..., k) long whose rows ``outer * inner + j`` (its leading dimensions
    but the first flattened into ``inner``) start at ``outer * stride_outer + j * k``: contiguous but for its first
    stride (a slice of a wider (B, C) buffer viewed (B, n, k)). Raises ValueError for other layouts."""
    if out.dtype != torch.long or out.dim() == 0 or out.shape[-1] != k:
        raise ValueError(f"out must be a (..., {k}) long tensor, got {tuple(out.shape)} {out.dtype}")
    if out.dim() == 1 or out.numel() == 0:  # nothing to write to: any layout
        return 1, k
    if not out[0].is_contiguous():
        raise ValueError("out must be contiguous but for its first stride")
    return max(out[0].numel() // k, 1), out.stride(0)


# A custom op: opaque to torch.compile, which then calls the launch as it is instead of tracing into it.
@torch.library.custom_op("medusa_llama::topk_indices", mutates_args=())
def _topk_indices_op(x: torch.Tensor, k: int) -> torch.Tensor:
    return triton_topk_indices(x, k)


@_topk_indices_op.register_fake
def _(x, k):
    return x.new_empty(*x.shape[:-1], k, dtype=torch.long)


@torch.library.custom_op("medusa_llama::topk_indices_into", mutates_args=("out",))
def _topk_indices_into_op(x: torch.Tensor, k: int, out: torch.Tensor) -> None:
    triton_topk_indices(x, k, out=out)


@_topk_indices_into_op.register_fake
def _(x, k, out):
    return None


def topk_indices(x: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., N) float32 / bfloat16 / float16. Returns (..., k) int64: the columns of each row's k largest values,
    best first, equal values lowest column first; 0 <= k <= N. By the Triton kernels on CUDA, else ``torch.topk``.
    ``out`` (..., k) long: written in place and returned; on CUDA it may be a slice of a wider buffer (contiguous
    but for its first stride, ``_out_layout``: the proposal's depths write into one buffer, no concatenation)."""
    if x.is_cuda and triton is not None:
        if out is None:
            return _topk_indices_op(x, k)
        _topk_indices_into_op(x, k, out)
        return out
    if out is None:
        return x.topk(k, dim=-1).indices
    torch.topk(x, k, dim=-1, out=(x.new_empty(out.shape), out))
    return out
