"""Tree attention over the filled part of a static KV cache: a split-K Triton kernel, and the SDPA reference.

T tree queries attend to every cached slot ``< cache_len`` and, among the tree's own T slots (written at
``cache_len .. cache_len + T - 1`` just before), to those ``tree_mask`` allows (Cai et al., 2024, Sec. 2.1.2).
SDPA with a dense additive mask over the whole static cache does that but reads and masks all S slots, which a
verify step pays in every layer (FACTS: 1.0 ms of 30 layers at T=16 against 0.2 ms at T=1). The kernel reads only
the ``cache_len + T`` live slots, with ``cache_len`` read on the device, so one CUDA graph per tree size stays valid
while the cache grows. Its design is flash-decoding's (Dao et al., 2023, "Flash-Decoding for long-context
inference"):

- split-K: the live slots are cut into splits of ``block_n * blocks_per_split`` keys; each program attends one
  tile of query rows to one split with an online softmax and writes a partial output with its log-sum-exp; a
  second kernel merges the splits (``o = sum_s exp(lse_s - lse) o_s``). The grid is fixed by the cache size S, not
  by ``cache_len``: programs whose split starts past the live slots do nothing, so the grid never changes between
  graph replays (the tiles per shape were measured on an H200: ``TUNED``);
- GQA: the G query heads of one KV head are processed together, as G * T rows of one tile, so each K/V block is
  loaded once for the whole group (SmolLM2: 9 query heads over 3 KV heads, G = 3; Llama-2-7B: G = 1);
- the tree mask is read only for keys at or past ``cache_len``; prefix keys need no mask at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the split kernel."""

    block_m: int = 64
    """Query rows (tree token x head of the group) per program; at least 16 (tl.dot)."""
    block_n: int = 64
    """Keys per block (one tl.dot)."""
    blocks_per_split: int = 2
    """Blocks per split: a split is block_n * blocks_per_split keys (128: 5 splits per KV head at 512 cached)."""
    num_warps: int = 4
    num_stages: int = 3
    merge_rows: int = 1
    """Query rows per merge program: 1, one row each (``_merge_kernel``); more, a tile of rows whose splits are read
    in one unrolled pass (``_merge_rows_kernel``): fewer, fuller programs where T is large."""


# The fastest configurations measured on an H200 by benchmarks/attention_sweep.py (which rewrites this block), by
# (head_dim, query rows rounded up to a power of two); other shapes take the default below.
# --- tuned: begin
TUNED: dict[tuple[int, int], KernelConfig] = {
    (64, 4): KernelConfig(16, 64, 1, 4, 3),
    (64, 8): KernelConfig(16, 64, 1, 4, 1),
    (64, 16): KernelConfig(16, 64, 1, 4, 2),
    (64, 32): KernelConfig(16, 64, 1, 4, 1),
    (64, 64): KernelConfig(16, 64, 1, 4, 2),
    (64, 128): KernelConfig(32, 64, 1, 4, 3),
    (64, 256): KernelConfig(64, 64, 1, 4, 1),
    (64, 512): KernelConfig(64, 64, 2, 4, 1),
    (128, 1): KernelConfig(16, 32, 1, 4, 2),
    (128, 64): KernelConfig(64, 32, 4, 4, 3),
}
# --- tuned: end


MERGE_WARPS = 1
"""Warps per one-row merge program for heads of up to 64 dims (its splits x head dim: 16 x 64 values for SmolLM2 at
2,048 slots); larger heads (Llama-2-7B's 128) keep Triton's default 4, not measured with fewer. One, not 4: on the
H200 the tree16 / 32 / 64 steps (192 to 576 merge programs a layer) took 1.0, 1.4 and 1.9 % less time, the vanilla
step (9 programs) the same (results/gpu/issue8/session10/ab1/steps_ab1.txt)."""


MERGE_ROWS_WARPS = 4
"""Warps per several-row merge program (``KernelConfig.merge_rows`` > 1)."""


def kernel_config(head_dim: int, rows: int) -> KernelConfig:
    """The split kernel's tiles for ``rows`` = T * (query heads per KV head) query rows."""
    rows_p2 = triton.next_power_of_2(rows)
    return TUNED.get((head_dim, rows_p2)) or KernelConfig(block_m=min(64, max(16, rows_p2)))


@triton.jit
def _split_kernel(
    Q,  # (B, T, nh, hd)
    K,  # (B, S, n_kv, hd): the cache, tree tokens included
    V,
    CacheLen,  # (B,) int64, stride stride_cl: committed slots of each sequence (stride 0: one for all)
    TreeMask,  # (T, T) bool or int8: tree_mask[i, j] != 0 if node i sees node j
    O_part,  # (B * n_kv, NUM_SPLITS, T * G, hd) float32: each split's normalised output
    L_part,  # (B * n_kv, NUM_SPLITS, T * G) float32: each split's log2-sum-exp2
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    T,
    stride_cl,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    N_KV: tl.constexpr,
    G: tl.constexpr,
    HD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // N_KV
    kvh = pid_bh % N_KV
    cache_len = tl.load(CacheLen + b * stride_cl).to(tl.int32)
    total = cache_len + T
    start = pid_s * (BLOCK_N * BLOCKS_PER_SPLIT)
    if start < total:  # splits past the live slots do nothing (the merge does not read them)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = t * G + g: query token t, head kvh * G + g
        row_ok = rows < T * G
        t = rows // G
        head = kvh * G + rows % G
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        q = tl.load(
            Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for j in range(BLOCKS_PER_SPLIT):
            n = start + j * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key slots
            n_ok = n < total
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k_ptrs = K + b * stride_kb + n[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            v_ptrs = V + b * stride_vb + n[:, None] * stride_vs + kvh * stride_vh + d[None, :]
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = (s * qk_scale).to(tl.float32)  # (BLOCK_M, BLOCK_N), log2 units (fp32 also where qk_scale is fp64)
            rel = n - cache_len  # key's index in the tree (< 0: prefix)
            in_tree = (rel >= 0) & n_ok
            tm = tl.load(
                TreeMask + t[:, None] * T + rel[None, :], mask=row_ok[:, None] & in_tree[None, :], other=0
            )  # (BLOCK_M, BLOCK_N): predicated off for prefix-only blocks, so they read no mask bytes
            allowed = ((rel < 0) & n_ok)[None, :] | (tm != 0)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key yet: exp2(-inf) = 0
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        o = acc / safe_l[:, None]
        lse = tl.where(l_i > 0, m_i + tl.math.log2(safe_l), float("-inf"))
        base = pid_bh * NUM_SPLITS + pid_s
        tl.store(O_part + (base * T * G + rows[:, None]) * HD + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(L_part + base * T * G + rows, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    O_part,
    L_part,
    Out,  # (B, T, nh, hd)
    CacheLen,
    T,
    stride_cl,
    stride_ob,
    stride_ot,
    stride_oh,
    N_KV: tl.constexpr,
    G: tl.constexpr,
    HD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # t * G + g
    pid_bh = tl.program_id(1)
    b = pid_bh // N_KV
    kvh = pid_bh % N_KV
    cache_len = tl.load(CacheLen + b * stride_cl).to(tl.int32)
    live = (cache_len + T + SPLIT_N - 1) // SPLIT_N  # splits the split kernel wrote
    s = tl.arange(0, BLOCK_S)
    s_ok = s < live
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    lse = tl.load(L_part + (pid_bh * NUM_SPLITS + s) * T * G + row, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    w = tl.math.exp2(lse - tl.max(lse, 0))  # 0 for unwritten and empty splits
    o = tl.load(
        O_part + ((pid_bh * NUM_SPLITS + s[:, None]) * T * G + row) * HD + d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    t = row // G
    head = kvh * G + row % G
    tl.store(Out + b * stride_ob + t * stride_ot + head * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_ok)


@triton.jit
def _merge_rows_kernel(
    O_part, L_part, Out, CacheLen, T, stride_cl, stride_ob, stride_ot, stride_oh,
    N_KV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_N: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``_merge_kernel`` for a tile of BLOCK_R query rows per program: the splits' log-sum-exps in one load, then
    every split's partial output (loads predicated off past the live splits, so they issue together)."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // N_KV
    kvh = pid_bh % N_KV
    cache_len = tl.load(CacheLen + b * stride_cl).to(tl.int32)
    live = (cache_len + T + SPLIT_N - 1) // SPLIT_N  # splits the split kernel wrote
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < T * G
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    base = pid_bh * NUM_SPLITS
    lse = tl.load(
        L_part + (base + s[:, None]) * T * G + rows[None, :],
        mask=(s < live)[:, None] & row_ok[None, :],
        other=float("-inf"),
    )  # (BLOCK_S, BLOCK_R)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_sum = tl.sum(tl.math.exp2(lse - m[None, :]), 0)  # (BLOCK_R,)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(NUM_SPLITS):
        ok = row_ok & (i < live)
        part = (base + i) * T * G + rows
        w = tl.math.exp2(tl.load(L_part + part, mask=ok, other=float("-inf")) - m)  # 0 past the live splits
        o = tl.load(O_part + part[:, None] * HD + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * o
    out = acc / tl.where(w_sum > 0, w_sum, 1.0)[:, None]
    t = rows // G
    head = kvh * G + rows % G
    tl.store(
        Out + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    tree_mask: torch.Tensor,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Attention of T tree tokens over the live cache, by the split-K Triton kernel (no host sync).

    q: (B, T, nh, hd), any strides with a unit last stride; k_cache, v_cache: (B, S, n_kv, hd), holding the tree
    tokens' keys and values at slots cache_len .. cache_len + T - 1; cache_len: 0-d long on q's device, or (B,)
    long, one cache length per sequence (batched decoding);
    tree_mask: (T, T) bool or int8. Returns (B, T, nh, hd) in q's dtype. ``config``: tiles (default: ``TUNED``).
    """
    if config is None:
        return _tree_attention_op(q, k_cache, v_cache, cache_len, tree_mask)
    return _launch(q, k_cache, v_cache, cache_len, tree_mask, config)


# A custom op: opaque to torch.compile, which calls it as it is instead of tracing into the Triton launches.
@torch.library.custom_op("medusa_llama::tree_attention", mutates_args=())
def _tree_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor, tree_mask: torch.Tensor
) -> torch.Tensor:
    b, t, nh, hd = q.shape
    return _launch(q, k_cache, v_cache, cache_len, tree_mask, kernel_config(hd, t * nh // k_cache.shape[2]))


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, cache_len, tree_mask):
    return q.new_empty(q.shape)


def _launch(q, k_cache, v_cache, cache_len, tree_mask, c: KernelConfig) -> torch.Tensor:
    """The split kernel, then the merge kernel; arguments as ``tree_attention``."""
    b, t, nh, hd = q.shape
    _, s_max, n_kv, _ = k_cache.shape
    g = nh // n_kv
    rows = t * g
    split_n = c.block_n * c.blocks_per_split
    num_splits = triton.cdiv(s_max, split_n)
    block_d = max(16, triton.next_power_of_2(hd))
    o_part = torch.empty(b * n_kv, num_splits, rows, hd, dtype=torch.float32, device=q.device)
    l_part = torch.empty(b * n_kv, num_splits, rows, dtype=torch.float32, device=q.device)
    out = torch.empty(b, t, nh, hd, dtype=q.dtype, device=q.device)
    stride_cl = cache_len.stride(0) if cache_len.dim() else 0  # 0-d: every sequence reads the one length
    _split_kernel[(num_splits, triton.cdiv(rows, c.block_m), b * n_kv)](
        q, k_cache, v_cache, cache_len, tree_mask.contiguous(), o_part, l_part,
        math.log2(math.e) / math.sqrt(hd), t, stride_cl,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        N_KV=n_kv, G=g, HD=hd, NUM_SPLITS=num_splits, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=block_d,
        BLOCKS_PER_SPLIT=c.blocks_per_split, IEEE=q.dtype == torch.float32,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip
    if c.merge_rows > 1:
        _merge_rows_kernel[(triton.cdiv(rows, c.merge_rows), b * n_kv)](
            o_part, l_part, out, cache_len, t, stride_cl, out.stride(0), out.stride(1), out.stride(2),
            N_KV=n_kv, G=g, HD=hd, NUM_SPLITS=num_splits, SPLIT_N=split_n,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_R=c.merge_rows, BLOCK_D=block_d,
            num_warps=MERGE_ROWS_WARPS,
        )  # fmt: skip
        return out
    _merge_kernel[(rows, b * n_kv)](
        o_part, l_part, out, cache_len, t, stride_cl, out.stride(0), out.stride(1), out.stride(2),
        N_KV=n_kv, G=g, HD=hd, NUM_SPLITS=num_splits, SPLIT_N=split_n,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=MERGE_WARPS if hd <= 64 else 4,
    )  # fmt: skip
    return out


def tree_attention_sdpa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor, tree_mask: torch.Tensor
) -> torch.Tensor:
    """The reference: SDPA over the cache sliced to the live slots, with a dense additive tree mask.

    Same arguments and result as ``tree_attention``; reads ``cache_len`` on the host (not graph-safe).
    """
    from medusa_llama.decode.model import batched_tree_attention_mask, sdpa, tree_attention_mask

    b, t, nh, hd = q.shape
    span = int(cache_len.max()) + t
    if cache_len.dim():  # one cache length per sequence
        mask = batched_tree_attention_mask(cache_len, tree_mask.bool(), span, q.dtype)  # (B, 1, T, span)
    else:
        mask = tree_attention_mask(cache_len, tree_mask.bool(), span, q.dtype)  # (1, 1, T, span)
    k = k_cache[:, :span].transpose(1, 2)  # (B, n_kv, span, hd)
    v = v_cache[:, :span].transpose(1, 2)
    y = sdpa(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=nh != k.shape[1])
    return y.transpose(1, 2)  # (B, T, nh, hd)
