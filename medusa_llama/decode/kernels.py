"""Fused Triton kernels for the GPU decode step: each replaces several small PyTorch kernels of ``model.py``.

On a one-token step of a small model every kernel is launch-bound (a few microseconds for a few kilobytes), so
the step's time is its kernel count. Per layer, the PyTorch path spends about six kernels on each RMSNorm (fp32
upcast, square, mean, rsqrt, scale, downcast), ten on rotary embedding, two on cache writes, two on the SwiGLU
product and one on each residual add. These three kernels do each group in one launch, with the same arithmetic
(fp32 statistics, rounding to the model dtype where HF's forward rounds), so a layer is four GEMMs, the two
attention kernels and four of these.

- ``add_rms_norm(x, y, w)``: the residual add and the next RMSNorm: ``h = x + y``; returns ``(h, rmsnorm(h) * w)``;
- ``rope_cache_write(qkv, cos, sin, slots, k_cache, v_cache)``: rotary embedding of q and k (Su et al., 2021) from
  the fused qkv projection, k and v written to their cache slots, q returned as (B, T, nh, hd);
- ``silu_mul(gate_up)``: SwiGLU's ``silu(gate) * up`` from the fused gate/up projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, Y, W, H, Out, D, eps, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < D
    x = tl.load(X + row * D + c, mask=ok, other=0.0)
    if HAS_Y:
        x = (x.to(tl.float32) + tl.load(Y + row * D + c, mask=ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * D + c, x, mask=ok)
    xf = x.to(tl.float32)
    r = tl.math.rsqrt((tl.sum(xf * xf, 0) / D + eps).to(tl.float32))
    n = (xf * r).to(X.dtype.element_ty)  # HF: normalise in fp32, round, then scale in the model dtype
    w = tl.load(W + c, mask=ok, other=0.0)
    tl.store(Out + row * D + c, (w.to(tl.float32) * n.to(tl.float32)).to(Out.dtype.element_ty), mask=ok)


def add_rms_norm(
    x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: (..., D) (y None: no add). Returns (x + y, RMSNorm(x + y) * weight), both like x."""
    if y is None:
        return x, _rms_norm(x, weight, eps)
    return _add_rms_norm(x, y, weight, eps)


# Each kernel is wrapped as a custom op: opaque to torch.compile, which then calls it as it is (and knows which
# arguments it writes) instead of tracing into the Triton launch.
@torch.library.custom_op("medusa_llama::add_rms_norm", mutates_args=())
def _add_rms_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = x.contiguous(), y.contiguous()
    h, out = torch.empty_like(x), torch.empty_like(x)
    d = x.shape[-1]
    _add_rms_norm_kernel[(x.numel() // d,)](x, y, weight, h, out, d, eps, HAS_Y=True, BLOCK=triton.next_power_of_2(d))
    return h, out


@_add_rms_norm.register_fake
def _(x, y, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("medusa_llama::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    d = x.shape[-1]
    _add_rms_norm_kernel[(x.numel() // d,)](x, x, weight, x, out, d, eps, HAS_Y=False, BLOCK=triton.next_power_of_2(d))
    return out


@_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@triton.jit
def _rope_cache_kernel(
    QKV,  # (B * T, (nh + 2 n_kv) * hd) contiguous
    Cos,  # (B * T, hd) contiguous
    Sin,
    Slots,  # (T,) int64
    Qout,  # (B * T, nh, hd) contiguous
    Kc,  # (B, S, n_kv, hd)
    Vc,
    T,
    stride_cb,
    stride_cs,
    stride_ch,
    NH: tl.constexpr,
    N_KV: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * T + t
    h = tl.program_id(1)  # q heads, then k heads, then v heads
    b = row // T
    d = tl.arange(0, BLOCK_D)
    ok = d < HD
    src = QKV + row * (NH + 2 * N_KV) * HD + h * HD
    x = tl.load(src + d, mask=ok, other=0.0)
    if h < NH + N_KV:
        half = HD // 2
        partner = tl.where(d < half, d + half, d - half)
        xp = tl.load(src + partner, mask=ok, other=0.0).to(tl.float32)
        rot = tl.where(d < half, -xp, xp)  # rotate_half(x)
        c = tl.load(Cos + row * HD + d, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(Sin + row * HD + d, mask=ok, other=0.0).to(tl.float32)
        y = (x.to(tl.float32) * c + rot * s).to(Qout.dtype.element_ty)
        if h < NH:
            tl.store(Qout + (row * NH + h) * HD + d, y, mask=ok)
        else:
            slot = tl.load(Slots + row % T)
            tl.store(Kc + b * stride_cb + slot * stride_cs + (h - NH) * stride_ch + d, y, mask=ok)
    else:
        slot = tl.load(Slots + row % T)
        tl.store(Vc + b * stride_cb + slot * stride_cs + (h - NH - N_KV) * stride_ch + d, x, mask=ok)


@torch.library.custom_op("medusa_llama::rope_cache_write", mutates_args=("k_cache", "v_cache"))
def rope_cache_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """qkv: (B, T, (nh + 2 n_kv) * hd); cos, sin: (B, T, hd); slots: (T,) long; caches (B, S, n_kv, hd) with equal
    strides and a unit last stride, written in place. Returns the rotated queries (B, T, nh, hd)."""
    b, t, _ = qkv.shape
    _, _, n_kv, hd = k_cache.shape
    q = torch.empty(b, t, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(b * t, n_heads + 2 * n_kv)](
        qkv.contiguous(), cos.contiguous(), sin.contiguous(), slots, q, k_cache, v_cache, t,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NH=n_heads, N_KV=n_kv, HD=hd, BLOCK_D=triton.next_power_of_2(hd),
    )  # fmt: skip
    return q


@rope_cache_write.register_fake
def _(qkv, cos, sin, slots, k_cache, v_cache, n_heads):
    b, t, _ = qkv.shape
    return qkv.new_empty(b, t, n_heads, k_cache.shape[-1])


@triton.jit
def _silu_mul_kernel(GU, Out, INTER, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < INTER
    gate = tl.load(GU + row * 2 * INTER + c, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GU + row * 2 * INTER + INTER + c, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty)  # F.silu rounds to the model dtype ...
    tl.store(Out + row * INTER + c, (act.to(tl.float32) * up).to(Out.dtype.element_ty), mask=ok)  # ... then * up


@torch.library.custom_op("medusa_llama::silu_mul", mutates_args=())
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (..., 2 I), gate first. Returns silu(gate) * up, (..., I)."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * inter)
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out


@silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@triton.jit
def _silu_residual_kernel(Z, S, Out, N, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = c < N
    z = tl.load(Z + c, mask=ok, other=0.0).to(tl.float32)
    act = (z / (1.0 + tl.exp(-z))).to(Out.dtype.element_ty)  # F.silu rounds to the model dtype ...
    s = tl.load(S + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + c, (s + act.to(tl.float32)).to(Out.dtype.element_ty), mask=ok)  # ... then the residual add


@torch.library.custom_op("medusa_llama::silu_residual", mutates_args=())
def silu_residual(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """z, s: (..., D), one shape. Returns s + silu(z) (the sequential heads' mix, ``heads.SequentialBlock``)."""
    z, s = z.contiguous(), s.contiguous()
    out = torch.empty_like(s)
    block = min(1024, triton.next_power_of_2(max(s.numel(), 1)))
    _silu_residual_kernel[(triton.cdiv(s.numel(), block),)](z, s, out, s.numel(), BLOCK=block)
    return out


@silu_residual.register_fake
def _(z, s):
    return torch.empty_like(s)


@triton.jit
def _greedy_accept_kernel(
    Pred, Tokens, Parent, Ret, Path, Out, Root, T, P, D1: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr
):
    row = tl.program_id(0)
    pred, tokens = Pred + row * T, Tokens + row * T
    p = tl.arange(0, BLOCK_P)
    j = tl.arange(0, BLOCK_J)
    node = tl.load(Ret + p[:, None] * D1 + j[None, :], mask=(p[:, None] < P) & (j[None, :] < D1), other=-1)
    real = node >= 0  # (BLOCK_P, BLOCK_J): path p's node at depth j
    up = tl.load(Parent + tl.maximum(node, 0), mask=real, other=-1)
    tok = tl.load(tokens + tl.maximum(node, 0), mask=real, other=0)
    ok = real & ((tok == tl.load(pred + tl.maximum(up, 0), mask=real, other=0)) | (up < 0))  # the root is kept
    accepted = tl.min(tl.where(ok, BLOCK_J, j[None, :]), 1) - 1  # (BLOCK_P,) leading accepted nodes, root excluded
    n = tl.max(accepted, 0)
    best = tl.min(tl.where(accepted == n, p, BLOCK_P), 0)  # the first longest path
    path = tl.maximum(tl.load(Ret + best * D1 + j, mask=j < D1, other=0), 0)  # (BLOCK_J,)
    after = tl.maximum(tl.load(Ret + best * D1 + j + 1, mask=j + 1 < D1, other=0), 0)  # path[j + 1]
    bonus = tl.load(pred + tl.maximum(tl.load(Ret + best * D1 + n), 0))  # the prediction after the last node
    emitted = tl.where(j == n, bonus, tl.load(tokens + after, mask=j + 1 < D1, other=0))  # padding past n + 1
    tl.store(Path + row * D1 + j, path, mask=j < D1)
    tl.store(Out + row * (D1 + 1), n.to(tl.int64))
    tl.store(Out + row * (D1 + 1) + 1 + j, emitted, mask=j < D1)
    tl.store(Root + row, bonus)


@torch.library.custom_op("medusa_llama::greedy_accept", mutates_args=("out", "root"))
def greedy_accept(
    pred: torch.Tensor,
    tokens: torch.Tensor,
    parent: torch.Tensor,
    retrieve: torch.Tensor,
    out: torch.Tensor,
    root: torch.Tensor,
) -> torch.Tensor:
    """Greedy acceptance and the step's emitted tokens in one launch (``acceptance.accept_into``, its reference).

    pred, tokens: (..., T) long, the backbone's argmax after each node and the tree's tokens; parent (T,), retrieve
    (P, D+1): the tree's. Writes out (..., D+2) = [n, accepted tokens, bonus token, padding] and root (...) = the
    bonus token; returns the first longest accepted path (..., D+1), clamped."""
    t, (p, d1) = tokens.shape[-1], retrieve.shape
    rows = tokens.numel() // t
    path = torch.empty(*tokens.shape[:-1], d1, dtype=torch.long, device=tokens.device)
    _greedy_accept_kernel[(rows,)](
        pred.contiguous(), tokens.contiguous(), parent.contiguous(), retrieve.contiguous(), path, out, root, t, p,
        D1=d1, BLOCK_P=triton.next_power_of_2(p), BLOCK_J=triton.next_power_of_2(d1 + 1), num_warps=1,
    )  # fmt: skip
    return path


@greedy_accept.register_fake
def _(pred, tokens, parent, retrieve, out, root):
    return tokens.new_empty(*tokens.shape[:-1], retrieve.shape[1])
