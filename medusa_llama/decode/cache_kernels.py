"""Triton kernels for a decode step's KV-cache bookkeeping on the GPU (the CPU keeps the PyTorch ops of ``model.py``).

A CUDA-graph step of a small model is launch-bound (``kernels.py``), so these replace groups of small PyTorch ops by
one launch each, reading every length and index on the device (no host sync, fixed shapes):

- ``move_path(k_cache, v_cache, cache_len, path)`` then ``advance(cache_len, n, active)``: the commit after
  acceptance (``model.commit_cache``, their reference): each sequence's accepted tree nodes move from their tree slots
  ``cache_len + path`` to ``cache_len + 0 .. D`` in every layer's K and V cache, then ``cache_len`` grows by ``n + 1``:
  two launches instead of ten PyTorch ops (slot arithmetic, a gather and a scatter per cache, the add). The advance
  is a launch of its own because every program of the move reads the old length, and Triton has no grid-wide barrier
  to order one write after all those reads. A Medusa step of one sequence moves its path in its acceptance's launch
  instead (``kernels.accept_move``, by the same ``_move_slots``), then advances by ``advance``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _move_slots(K, V, at, base, path, j, D1, W, stride_s, BLOCK_W: tl.constexpr):
    """One (layer, row) of the move: slots ``base + path[j]`` to ``base + j`` for j < D1, in K and V at offset ``at``;
    path (BLOCK_J,) node indices (negative: padding, read as the root), j its arange. Every thread's reads complete
    before any write: the caller's program must own these slots (no other program of its grid touches them)."""
    w = tl.arange(0, BLOCK_W)
    ok = (j < D1)[:, None] & (w < W)[None, :]
    src_off = at + (base + tl.maximum(path, 0))[:, None] * stride_s + w[None, :]  # (BLOCK_J, BLOCK_W)
    dst_off = at + (base + j)[:, None] * stride_s + w[None, :]
    k = tl.load(K + src_off, mask=ok)
    v = tl.load(V + src_off, mask=ok)
    # The source and destination slots overlap (node path[j] >= j moves down to slot j, and padding past the path
    # reads the root's slot), and another thread may hold a slot this one writes: every thread's reads complete
    # before any write, the gather-then-scatter of the PyTorch form.
    tl.debug_barrier()
    tl.store(K + dst_off, k, mask=ok)
    tl.store(V + dst_off, v, mask=ok)


@triton.jit
def _move_path_kernel(
    K,  # (L, B, S, W) with W = n_kv * hd contiguous
    V,
    CacheLen,  # (B,) long, or one length for every row (stride 0)
    Path,  # (B, D1) long, node indices (negative: padding, read as the root)
    D1,
    W,
    stride_l,
    stride_b,
    stride_s,
    stride_cl,
    BLOCK_J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)  # one program owns each (layer, row)
    j = tl.arange(0, BLOCK_J)
    base = tl.load(CacheLen + row * stride_cl)
    path = tl.load(Path + row * D1 + j, mask=j < D1, other=0)
    _move_slots(K, V, layer * stride_l + row * stride_b, base, path, j, D1, W, stride_s, BLOCK_W)


@triton.jit
def _advance_kernel(CacheLen, N, Active, B, stride_n, HAS_ACTIVE: tl.constexpr, BLOCK_B: tl.constexpr):
    b = tl.arange(0, BLOCK_B)
    ok = b < B
    step = tl.load(N + b * stride_n, mask=ok, other=0) + 1
    if HAS_ACTIVE:
        step = tl.where(tl.load(Active + b, mask=ok, other=0) != 0, step, 0)
    tl.store(CacheLen + b, tl.load(CacheLen + b, mask=ok, other=0) + step, mask=ok)


@torch.library.custom_op("medusa_llama::move_path", mutates_args=("k_cache", "v_cache"))
def move_path(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor, path: torch.Tensor) -> None:
    """Move each row's tree slots ``cache_len[b] + path[b, j]`` to ``cache_len[b] + j`` in every layer, reading all
    before writing any. k_cache, v_cache: (L, B, S, n_kv, hd), the same strides, each slot's (n_kv, hd) contiguous;
    cache_len (B,) long, contiguous, or 0-d for every row; path (B, D1) long (or (D1,) for B = 1), root first and
    ascending up to the accepted node count, then padding (negative or 0: the root's slot). All D1 slots move (those
    past the accepted ones land beyond the new cache length)."""
    n_layers, b, _, n_kv, hd = k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == hd and k_cache.stride(4) == 1
    paths = path.reshape(b, -1).contiguous()
    d1 = paths.shape[1]
    _move_path_kernel[(n_layers, b)](
        k_cache, v_cache, cache_len, paths, d1, n_kv * hd,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cache_len.stride(0) if cache_len.dim() else 0,
        BLOCK_J=triton.next_power_of_2(d1), BLOCK_W=triton.next_power_of_2(n_kv * hd),
    )  # fmt: skip


@move_path.register_fake
def _(k_cache, v_cache, cache_len, path):
    return None


@torch.library.custom_op("medusa_llama::advance", mutates_args=("cache_len",))
def advance(cache_len: torch.Tensor, n: torch.Tensor, active: torch.Tensor | None = None) -> None:
    """``cache_len += (n + 1) * active`` in one launch: cache_len (B,) long, contiguous, or 0-d; n like it, any
    stride (the decoders pass a column of their output); active (B,) bool, None: every row advances."""
    b = cache_len.numel()
    _advance_kernel[(1,)](
        cache_len, n, n if active is None else active, b, n.stride(0) if n.dim() else 0,
        HAS_ACTIVE=active is not None, BLOCK_B=triton.next_power_of_2(b), num_warps=1,
    )  # fmt: skip


@advance.register_fake
def _(cache_len, n, active=None):
    return None
