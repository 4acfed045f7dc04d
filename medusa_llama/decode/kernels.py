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

The Medusa proposal's (``proposal.py``) kernels, with the same arithmetic as its PyTorch path:

- ``sequential_mix``: one depth of the sequential heads' mix ``s + silu(A s + b + B e)``, its inputs gathered
  from the previous depth's states and top-k columns (six launches -> one);
- ``tree_tokens``: the candidate tree's tokens, root included, from the depths' top-k columns (three -> one);
- ``silu_residual``: ``s + silu(z)`` alone (the mix where ``sequential_mix`` does not apply);
- ``argmax_keys``: a greedy step's argmax, stage 1: each chunk of a row's logits (bf16 as they are: no cast) reduced
  to one key, which ``greedy_token`` (vanilla decoding: the argmax into the root and the step's output, in place of
  two copies) or ``greedy_accept`` reduces where it reads a prediction (cast + argmax -> one launch);
- ``greedy_accept``: greedy acceptance and the step's emitted tokens (``acceptance.py``);
- ``path_inputs``: the prefix layer's inputs after a step (the accepted path's hidden states, its successors'
  embeddings, slots, rotary tables) and its cache length's advance (``prefix.PrefixCache.extend_path``; six -> one);
- ``accept_move``: ``greedy_accept``, the commit's K/V move (``cache_kernels.move_path``) and ``path_inputs`` in one
  launch of one program per layer and one more (``acceptance.accept_move_into``; three -> one).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from medusa_llama.decode.cache_kernels import _move_slots
from medusa_llama.decode.topk import _DEAD, _LOW, _pack


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
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * T + t
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # heads: q, then k, then v
    b = row // T
    d = tl.arange(0, BLOCK_D)
    ok = (h < NH + 2 * N_KV)[:, None] & (d < HD)[None, :]
    src = QKV + row * (NH + 2 * N_KV) * HD + h[:, None] * HD
    x = tl.load(src + d[None, :], mask=ok, other=0.0)  # (BLOCK_H, BLOCK_D)
    half = HD // 2
    partner = tl.where(d < half, d + half, d - half)
    xp = tl.load(src + partner[None, :], mask=ok & (h < NH + N_KV)[:, None], other=0.0).to(tl.float32)
    rot = tl.where((d < half)[None, :], -xp, xp)  # rotate_half(x)
    c = tl.load(Cos + row * HD + d, mask=d < HD, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + row * HD + d, mask=d < HD, other=0.0).to(tl.float32)[None, :]
    y = (x.to(tl.float32) * c + rot * s).to(Qout.dtype.element_ty)
    tl.store(Qout + (row * NH + h[:, None]) * HD + d[None, :], y, mask=ok & (h < NH)[:, None])
    cache = b * stride_cb + tl.load(Slots + row % T) * stride_cs + d[None, :]
    is_k = (h >= NH) & (h < NH + N_KV)
    tl.store(Kc + cache + (h[:, None] - NH) * stride_ch, y, mask=ok & is_k[:, None])
    tl.store(Vc + cache + (h[:, None] - NH - N_KV) * stride_ch, x, mask=ok & (h >= NH + N_KV)[:, None])


ROPE_BLOCK = 1024
"""Elements (heads x head dim) per ``rope_cache_write`` program: a token's 15 heads of 64 in one program for
SmolLM2 (one head a program before: 960 programs at T = 64, measured slower on the H200; 64 restores that)."""


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
    block_d = triton.next_power_of_2(hd)
    heads = n_heads + 2 * n_kv
    block_h = min(triton.next_power_of_2(heads), 1 << (max(1, ROPE_BLOCK // block_d).bit_length() - 1))
    _rope_cache_kernel[(b * t, triton.cdiv(heads, block_h))](
        qkv.contiguous(), cos.contiguous(), sin.contiguous(), slots, q, k_cache, v_cache, t,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NH=n_heads, N_KV=n_kv, HD=hd, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=max(1, min(4, block_h * block_d // 256)),
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


SILU_BLOCK = 1024
"""Columns per ``silu_mul`` program (SmolLM2's 1536: two a row). A whole row a program (2048) measured slower on the
H200: 1.54 against 1.22 us at T = 64, 1.31 against 1.03 at T = 1 (results/gpu/issue8/session9/)."""


@torch.library.custom_op("medusa_llama::silu_mul", mutates_args=())
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (..., 2 I), gate first. Returns silu(gate) * up, (..., I)."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * inter)
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    block = min(SILU_BLOCK, triton.next_power_of_2(inter))
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


ARGMAX_CHUNK_MIN = 2048
"""The fewest columns per ``argmax_keys`` program (one row of 49152: 24 programs of 4 KB in bf16)."""
ARGMAX_CHUNK_MAX = 8192
"""The most columns per ``argmax_keys`` program (a 64-node tree over 49152: 6 chunks, 384 programs)."""
ARGMAX_PROGRAMS = 264
"""``argmax_keys`` takes the widest chunk that still launches this many programs (two per SM of an H200's 132):
few chunks keep ``greedy_accept``'s max over them cheap, enough programs spread the read over the GPU."""
_NAN_KEY = tl.constexpr(0x7FFFFFFF << 32)  # a NaN's high word: above every other value, one for every NaN


def _argmax_chunk(rows: int, n: int) -> int:
    """``argmax_keys``'s columns per program (a power of two) for ``rows`` rows of ``n`` columns."""
    if n <= ARGMAX_CHUNK_MIN:
        return max(16, triton.next_power_of_2(n))
    chunk = ARGMAX_CHUNK_MAX
    while chunk > ARGMAX_CHUNK_MIN and rows * triton.cdiv(n, chunk) < ARGMAX_PROGRAMS:
        chunk //= 2
    return chunk


@triton.jit
def _column(key):
    """The column a ``topk._keys`` key packs (its low word)."""
    return (key & _LOW) ^ _LOW


@triton.jit
def _best_key(x, cols, live, N, AXIS: tl.constexpr):
    """The best of fp32 values ``x`` along ``AXIS`` as one ``topk._keys`` key: the largest value at its lowest column
    (``cols``, broadcast against x; ``live`` masks columns past N), after fp32 and int32 reductions (the int64 key of
    every element cost more: 6.3 us for 64 rows of 49152 on an H200). ``argmax_keys`` and ``lm_head`` share it."""
    top = tl.max(x, AXIS)
    first = tl.min(tl.where((x == tl.expand_dims(top, AXIS)) & live, cols, N), AXIS)  # -0.0 == +0.0 here
    key = _pack(top, first)
    # torch.argmax's NaN rule: a NaN is the maximum, the first NaN wins (one high word above +inf's for every NaN)
    first_nan = tl.min(tl.where((x != x) & live, cols, N), AXIS)
    return tl.where(first_nan < N, (first_nan ^ _LOW).to(tl.int64) | _NAN_KEY, key)


@triton.jit
def _argmax_keys_kernel(X, Keys, N, stride_row, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    live = cols < N
    x = tl.load(X + row * stride_row + cols, mask=live, other=float("-inf")).to(tl.float32)
    tl.store(Keys + row * C + chunk, _best_key(x, cols, live, N, 0))


@torch.library.custom_op("medusa_llama::argmax_keys", mutates_args=())
def argmax_keys(x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Stage 1 of a greedy step's argmax, one launch: x (..., N) float32 / bfloat16 / float16, read as it is (the
    upcast to fp32 is exact: the LM head's bf16 logits need no cast kernel first). Returns (..., C) int64: each chunk
    of ``chunk`` columns' best key (``topk._keys``: value, then lowest column; a NaN above all, as ``torch.argmax``
    has it). The argmax is the largest of a row's C keys' column, ``(key & 0x7FFFFFFF) ^ 0x7FFFFFFF``: ``greedy_accept``
    and ``greedy_token`` take it there, or ``argmax_of``. ``chunk`` 0: ``_argmax_chunk``'s choice.

    It replaces the fp32 cast and ``torch.argmax``, which reduces a row in one block: 13 us for one row of 49152 on
    an H200, where C programs share the read."""
    n = x.shape[-1]
    if not 0 < n < 2**31:
        raise ValueError(f"argmax over rows of {n} columns: 1 .. 2**31 - 1")
    rows = x.numel() // n
    chunk = chunk or _argmax_chunk(rows, n)
    c = triton.cdiv(n, chunk)
    keys = torch.empty(*x.shape[:-1], c, dtype=torch.long, device=x.device)
    if rows:
        x2 = x.reshape(rows, n)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        warps = max(1, min(16, chunk // 512))
        _argmax_keys_kernel[(rows, c)](x2, keys, n, x2.stride(0), c, BLOCK=chunk, num_warps=warps)
    return keys


@argmax_keys.register_fake
def _(x, chunk=0):
    n = x.shape[-1]
    c = triton.cdiv(n, chunk or _argmax_chunk(x.numel() // n, n))
    return x.new_empty(*x.shape[:-1], c, dtype=torch.long)


def argmax_of(keys: torch.Tensor) -> torch.Tensor:
    """(..., C) ``argmax_keys`` -> (...,) long, the argmax (by PyTorch ops: for tests and the odd caller; the decode
    steps' kernels read the keys themselves)."""
    return (keys.amax(-1) & 0x7FFFFFFF) ^ 0x7FFFFFFF


@triton.jit
def _greedy_token_kernel(Keys, Token, Out, C, stride_out, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    best = tl.max(tl.load(Keys + row * C + c, mask=c < C, other=_DEAD), 0)
    token = _column(best)
    tl.store(Token + row, token)
    tl.store(Out + row * stride_out + 1, token)


@torch.library.custom_op("medusa_llama::greedy_token", mutates_args=("token", "out"))
def greedy_token(keys: torch.Tensor, token: torch.Tensor, out: torch.Tensor) -> None:
    """Stage 2 of the vanilla step's argmax, one launch: from ``argmax_keys``'s (..., C) keys, writes the argmax
    into ``token`` (...) (the next root) and ``out[..., 1]`` (out (..., W) with a unit last stride: the step's
    emitted token after n = 0), in place of the two copies the step made after ``torch.argmax``."""
    c = keys.shape[-1]
    rows = keys.numel() // c
    _greedy_token_kernel[(rows,)](
        keys.contiguous(), token, out, c, out.stride(-2) if out.dim() > 1 else 0,
        BLOCK_C=triton.next_power_of_2(c), num_warps=1,
    )  # fmt: skip


@triton.jit
def _greedy_path(
    Keys, Tokens, Ret, P, C, D1: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Greedy acceptance of one sequence (``greedy_accept``): Keys (T, C) ``argmax_keys`` of the logits after each
    node, Tokens (T,) the tree's tokens, Ret (P, D1) its root-to-leaf paths (-1 padded). Returns n (the accepted
    candidates), the first longest accepted path (BLOCK_J,) clamped and the emitted tokens (BLOCK_J,): the accepted
    ones, the bonus token at n, then the padding: the root's token (a clamped path's successor), 0 in the last row.

    Two dependent load rounds: the retrieve table's node and its child on the path (each path's next entry: a tree's
    static parent table read the other way round, so a dynamic tree's buffers serve too), then the child's token
    and the node's prediction (its C chunk keys); the chosen path, its successors' tokens and the bonus token are
    taken from those tiles (a row selected by ``tl.where`` and summed), not loaded again."""
    p = tl.arange(0, BLOCK_P)
    j = tl.arange(0, BLOCK_J)
    c = tl.arange(0, BLOCK_C)
    live = p[:, None] < P
    at = Ret + p[:, None] * D1 + j[None, :]
    node = tl.load(at, mask=live & (j < D1)[None, :], other=-1)  # (BLOCK_P, BLOCK_J): path p's node at depth j
    inner = live & (j + 1 < D1)[None, :]
    child = tl.load(at + 1, mask=inner, other=-1)  # the node at depth j + 1 (none: -1)
    tok = tl.load(Tokens + tl.maximum(child, 0), mask=inner, other=0)  # its token (past the path: the root's; 0 last)
    # the prediction after each node: the best of its C chunk keys (BLOCK_P, BLOCK_J, BLOCK_C), then its column
    key_at = Keys + tl.maximum(node, 0)[:, :, None] * C + c[None, None, :]
    pred = _column(tl.max(tl.load(key_at, mask=(node >= 0)[:, :, None] & (c < C)[None, None, :], other=_DEAD), 2))
    hit = (child >= 0) & (tok == pred)  # the child is accepted if its parent is
    accepted = tl.min(tl.where(hit, BLOCK_J, j[None, :]), 1)  # (BLOCK_P,) leading hits: path p's accepted nodes
    n = tl.max(accepted, 0)
    best = (p == tl.min(tl.where(accepted == n, p, BLOCK_P), 0))[:, None]  # the first longest path's row
    path = tl.sum(tl.where(best, tl.maximum(node, 0), 0), 0)  # (BLOCK_J,)
    bonus = tl.sum(tl.sum(tl.where(best & (j == n)[None, :], pred, 0), 1), 0)  # the prediction after node n
    emitted = tl.where(j == n, bonus, tl.sum(tl.where(best, tok, 0), 0))  # the token after each path row
    return n, path, emitted, bonus


@triton.jit
def _store_accepted(Path, Out, Root, n, path, emitted, bonus, j, D1: tl.constexpr):
    """``greedy_accept``'s outputs for one sequence: the path (D1,), out (D1 + 1,) = [n, emitted] and the root."""
    tl.store(Path + j, path, mask=j < D1)
    tl.store(Out, n.to(tl.int64))
    tl.store(Out + 1 + j, emitted, mask=j < D1)
    tl.store(Root, bonus)


@triton.jit
def _greedy_accept_kernel(
    Keys,  # (rows, T, C) argmax_keys: the backbone's argmax after each node
    Tokens,  # (rows, T)
    Ret,  # (P, D1)
    Path,  # (rows, D1)
    Out,  # (rows, D1 + 1)
    Root,  # (rows,)
    T,
    P,
    C,
    D1: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    n, path, emitted, bonus = _greedy_path(
        Keys + row * T * C, Tokens + row * T, Ret, P, C, D1, BLOCK_P, BLOCK_J, BLOCK_C
    )
    j = tl.arange(0, BLOCK_J)
    _store_accepted(Path + row * D1, Out + row * (D1 + 1), Root + row, n, path, emitted, bonus, j, D1)


def _accept_blocks(keys: torch.Tensor, retrieve: torch.Tensor) -> dict:
    """The acceptance's tile sizes (``_greedy_path``) and its warps: the (P, J, C) key gather ~16 keys a thread."""
    (p, d1), c = retrieve.shape, keys.shape[-1]
    block_p, block_j, block_c = triton.next_power_of_2(p), triton.next_power_of_2(d1), triton.next_power_of_2(c)
    warps = max(1, min(8, block_p * block_j * block_c // 512))
    return dict(D1=d1, BLOCK_P=block_p, BLOCK_J=block_j, BLOCK_C=block_c, num_warps=warps)


@torch.library.custom_op("medusa_llama::greedy_accept", mutates_args=("out", "root"))
def greedy_accept(
    keys: torch.Tensor, tokens: torch.Tensor, retrieve: torch.Tensor, out: torch.Tensor, root: torch.Tensor
) -> torch.Tensor:
    """Greedy acceptance and the step's emitted tokens in one launch (``acceptance.accept_into``, its reference).

    keys (..., T, C): ``argmax_keys`` of the logits after each node (the kernel takes each node's argmax from its C
    chunks' keys where it reads it: no argmax kernel between); tokens (..., T) long, the tree's tokens; retrieve
    (P, D+1): the tree's paths. Writes out (..., D+2) = [n, accepted tokens, bonus token, padding] and root (...)
    = the bonus token; returns the first longest accepted path (..., D+1), clamped."""
    t, c, (p, d1) = tokens.shape[-1], keys.shape[-1], retrieve.shape
    rows = tokens.numel() // t
    path = torch.empty(*tokens.shape[:-1], d1, dtype=torch.long, device=tokens.device)
    _greedy_accept_kernel[(rows,)](
        keys.contiguous(), tokens.contiguous(), retrieve.contiguous(), path, out, root, t, p, c,
        **_accept_blocks(keys, retrieve),
    )  # fmt: skip
    return path


@greedy_accept.register_fake
def _(keys, tokens, retrieve, out, root):
    return tokens.new_empty(*tokens.shape[:-1], retrieve.shape[1])


@triton.jit
def _sequential_mix_kernel(
    S,  # (B * S_ROWS, D) the previous depth's head states
    Rows,  # (N,) each output row's parent row in S (per sequence)
    Tok,  # (B, C) the previous depth's top-k columns (the root token at depth 0), row b at b * TOK_STRIDE
    Cols,  # (N,) each output row's entry in Tok (per sequence)
    Table,  # (V, D) the embedding row of each column
    A,  # (D, D) state weight (out, in)
    Bias,  # (D,)
    Bt,  # (D, D) token weight (out, in)
    Out,  # (B * N, D)
    M,  # B * N output rows
    N,
    S_ROWS,
    TOK_STRIDE,
    D: tl.constexpr,  # constexpr: the K loop's trip count (and Triton's interpreter needs it so)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT16: tl.constexpr,
):
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # output rows b * N + j
    m_ok = m < M
    b, j = m // N, m % N
    src = b * S_ROWS + tl.load(Rows + j, mask=m_ok, other=0)  # (BLOCK_M,) parent state rows
    tok = tl.load(Tok + b * TOK_STRIDE + tl.load(Cols + j, mask=m_ok, other=0), mask=m_ok, other=0)  # embedding rows
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's output features
    n_ok = n < D
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # A s
    acc_e = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # B e
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        x_ok = m_ok[:, None] & k_ok[None, :]
        w_ok = k_ok[:, None] & n_ok[None, :]
        s = tl.load(S + src[:, None] * D + k[None, :], mask=x_ok, other=0.0)  # (BLOCK_M, BLOCK_K)
        e = tl.load(Table + tok[:, None] * D + k[None, :], mask=x_ok, other=0.0).to(s.dtype)  # heads' dtype
        a = tl.load(A + n[None, :] * D + k[:, None], mask=w_ok, other=0.0)  # (BLOCK_K, BLOCK_N): A^T's tile
        bt = tl.load(Bt + n[None, :] * D + k[:, None], mask=w_ok, other=0.0)
        if DOT16:  # 16-bit operands as they are, fp32 accumulation (a GPU: the tensor cores' native bf16 MMA)
            acc_s += tl.dot(s, a)
            acc_e += tl.dot(e, bt.to(e.dtype))
        else:
            # fp32 operands: 16-bit values are exact in tf32, so PRECISION "tf32" multiplies them exactly as a bf16
            # GEMM does (and Triton's interpreter has no bf16 tl.dot); "ieee" for fp32 heads, as cuBLAS without tf32
            acc_s += tl.dot(s.to(tl.float32), a.to(tl.float32), input_precision=PRECISION)
            acc_e += tl.dot(e.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
    dt = Out.dtype.element_ty
    z = (acc_s + tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(dt)  # addmm: A s + b, rounded
    z = (z.to(tl.float32) + acc_e).to(dt).to(tl.float32)  # the second addmm adds B e, rounding once
    act = (z / (1.0 + tl.exp(-z))).to(dt)  # F.silu rounds to the model dtype ...
    out_ok = m_ok[:, None] & n_ok[None, :]
    s = tl.load(S + src[:, None] * D + n[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(Out + m[:, None] * D + n[None, :], (s + act.to(tl.float32)).to(dt), mask=out_ok)  # ... then + s


MIX_BLOCK_N = 32
"""Output features per ``sequential_mix`` program (D = 576: 18 programs a depth, each reading 2 x 32 weight rows).
Its products are ``tl.dot`` on tiles of at least 16 rows (padded); a multiply-reduce form without the padding measured
4-8x slower on the H200 (``results/gpu/issue8/session8/final/mix_sweep.txt``) and was removed."""
MIX_BLOCK_K = 64
"""The K tile."""
MIX_DOT16 = True
"""The ``tl.dot``'s 16-bit operands (bf16 / fp16 heads) as they are on a GPU, instead of widened to fp32 for a
tf32 product: the same exact products, fp32 sums in the MMA's order. Triton's interpreter keeps the fp32 form (its
16-bit ``tl.dot`` is not exact), so only the GPU runs this one (``benchmarks/mix_sweep.py`` checks its error there)."""
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MIX_NUM_WARPS = 4
"""Warps per ``sequential_mix`` program."""


@torch.library.custom_op("medusa_llama::sequential_mix", mutates_args=())
def sequential_mix(
    states: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    columns: torch.Tensor,
    table: torch.Tensor,
    state_weight: torch.Tensor,
    state_bias: torch.Tensor,
    token_weight: torch.Tensor,
) -> torch.Tensor:
    """One depth of the sequential heads' mix with its gathers (``heads.SequentialBlock.gathered``), one launch:

    ``out[b, j] = s + silu(A s + bias + B e)``, ``s = states[b, rows[j]]``, ``e = table[tokens[b, columns[j]]]``.

    It replaces ``states.index_select(1, rows)``, ``tokens.index_select(1, columns)``, the embedding gather, the
    two GEMMs (``addmm``: ``A s + bias``, then ``+ B e``) and ``silu_residual``, with their rounding (fp32
    accumulation, the model dtype after each GEMM and after the SiLU). states (B, S, D); rows, columns (N,) long;
    tokens (B, C) long (any row stride); table (V, D) (cast to the states' dtype like ``token_emb.to``);
    A, B (D, D) (out, in); bias (D,). Returns (B, N, D) in the states' dtype."""
    states = states.contiguous()
    if tokens.stride(-1) != 1:  # rows may be apart (a slice of the proposal's top-k buffer): no copy
        tokens = tokens.contiguous()
    batch, s_rows, d = states.shape
    n = rows.numel()
    out = states.new_empty(batch, n, d)
    m = batch * n
    block_m = min(64, max(16, triton.next_power_of_2(m)))  # tl.dot needs at least 16 in every dimension
    block_n = min(MIX_BLOCK_N, max(16, triton.next_power_of_2(d)))
    block_k = min(MIX_BLOCK_K, max(16, triton.next_power_of_2(d)))
    _sequential_mix_kernel[(triton.cdiv(d, block_n), triton.cdiv(m, block_m))](
        states, rows.contiguous(), tokens, columns.contiguous(), table.contiguous(), state_weight.contiguous(),
        state_bias.contiguous(), token_weight.contiguous(), out, m, n, s_rows, tokens.stride(0), d,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if states.dtype == torch.float32 else "tf32", num_warps=MIX_NUM_WARPS,
        DOT16=MIX_DOT16 and states.dtype in (torch.bfloat16, torch.float16) and not _INTERPRETED,
    )  # fmt: skip
    return out


@sequential_mix.register_fake
def _(states, rows, tokens, columns, table, state_weight, state_bias, token_weight):
    return states.new_empty(states.shape[0], rows.numel(), states.shape[2])


@triton.jit
def _tree_tokens_kernel(Root, Top, Columns, Ids, Out, C, T, stride_out, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # tree nodes
    child = (i > 0) & (i < T)
    col = tl.load(Top + row * C + tl.load(Columns + i - 1, mask=child, other=0), mask=child, other=0)
    if HAS_IDS:
        col = tl.load(Ids + col, mask=child, other=0)
    token = tl.where(i == 0, tl.load(Root + row), col)
    tl.store(Out + row * stride_out + i, token, mask=i < T)


@torch.library.custom_op("medusa_llama::tree_tokens", mutates_args=("out",))
def tree_tokens(
    root: torch.Tensor, top: torch.Tensor, columns: torch.Tensor, ids: torch.Tensor | None, out: torch.Tensor
) -> None:
    """The candidate trees' tokens in one launch (``proposal.propose``): ``out[b, 0] = root[b]`` and, for node
    i >= 1, ``out[b, i] = ids[top[b, columns[i - 1]]]`` (``top[...]`` itself where ``ids`` is None).

    It replaces ``top.index_select(1, columns)``, the draft vocabulary's ``ids[...]`` and the ``torch.cat`` with the
    root. root (B,) long; top (B, C) long, the depths' top-k columns; columns (T-1,) long; ids (N,) long or None;
    out (B, T) long with a unit last stride, written in place."""
    batch, t = out.shape
    block = min(1024, triton.next_power_of_2(t))
    top = top.contiguous()
    _tree_tokens_kernel[(batch, triton.cdiv(t, block))](
        root.contiguous(), top, columns.contiguous(), top if ids is None else ids, out, top.shape[1], t,
        out.stride(0), HAS_IDS=ids is not None, BLOCK=block, num_warps=1,
    )  # fmt: skip


@triton.jit
def _store_path_inputs(
    Hidden,  # (T, D) the verify forward's hidden states
    Table,  # (V, D) the input embedding (read with HAS_TABLE)
    Rope,  # (2, S, HD) cos and sin of every position
    Len,  # (1,) the prefix cache's length, advanced by n + 1 in place
    HOut,  # (D1, D) hidden[path]
    EOut,  # (D1, D) table[tokens]
    CsOut,  # (2, D1, HD) cos and sin at the new rows' positions
    Slots,  # (D1,) the new rows' slots: length .. length + D1 - 1
    Start,  # (1,) the length before the extend
    length,  # the value at Len, loaded by the caller (first: nothing else it loads waits for it)
    node,  # (BLOCK_R,) the accepted path's nodes (clamped; rows past n are padding)
    tok,  # (BLOCK_R,) the emitted tokens: each path row's successor
    n,  # the accepted length
    r,  # (BLOCK_R,) arange
    D,
    S,
    D1: tl.constexpr,
    HD: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """``path_inputs``' work for one program, given the path and its tokens (loaded, or computed by the caller)."""
    r_ok = r < D1
    c = tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (c < D)[None, :]
    tl.store(HOut + r[:, None] * D + c[None, :], tl.load(Hidden + node[:, None] * D + c[None, :], mask=ok), mask=ok)
    if HAS_TABLE:
        tl.store(EOut + r[:, None] * D + c[None, :], tl.load(Table + tok[:, None] * D + c[None, :], mask=ok), mask=ok)
    slot = length + r
    tl.store(Slots + r, slot, mask=r_ok)
    h = tl.arange(0, BLOCK_HD)
    rope_ok = (r_ok & (slot < S))[:, None] & (h < HD)[None, :]
    at = slot[:, None] * HD + h[None, :]
    out = r[:, None] * HD + h[None, :]
    tl.store(CsOut + out, tl.load(Rope + at, mask=rope_ok, other=0.0), mask=rope_ok)
    tl.store(CsOut + D1 * HD + out, tl.load(Rope + S * HD + at, mask=rope_ok, other=0.0), mask=rope_ok)
    tl.store(Start, length)
    advanced = length + n + 1
    tl.debug_barrier()  # every thread has read the old length before it is overwritten
    tl.store(Len, advanced)


@triton.jit
def _path_inputs_kernel(
    Hidden,
    Path,  # (D1,) the accepted path's nodes (clamped; rows past n are padding)
    Tok,  # (D1,) the emitted tokens: each path row's successor
    N,  # (1,) the accepted length n
    Table,
    Rope,
    Len,
    HOut,
    EOut,
    CsOut,
    Slots,
    Start,
    D,
    S,
    D1: tl.constexpr,
    HD: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    length = tl.load(Len)
    r = tl.arange(0, BLOCK_R)
    node = tl.load(Path + r, mask=r < D1, other=0)
    tok = tl.load(Tok + r, mask=r < D1, other=0) if HAS_TABLE else node
    _store_path_inputs(
        Hidden, Table, Rope, Len, HOut, EOut, CsOut, Slots, Start, length, node, tok, tl.load(N), r, D, S, D1, HD,
        HAS_TABLE, BLOCK_D, BLOCK_HD,
    )  # fmt: skip


@torch.library.custom_op("medusa_llama::path_inputs", mutates_args=("length",))
def path_inputs(
    hidden: torch.Tensor,
    path: torch.Tensor,
    tokens: torch.Tensor,
    n: torch.Tensor,
    table: torch.Tensor | None,
    rope: torch.Tensor,
    length: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prefix layer's inputs after a Medusa step, in one launch (``prefix.PrefixCache.extend_path``):

    ``rows = hidden[path]`` (D1, D), ``emb = table[tokens]`` (D1, D; (0, D) where ``table`` is None),
    ``cos_sin = rope[:, slots]`` (2, D1, hd), ``slots = length + arange(D1)``, ``start`` = the length before, and
    ``length += n + 1`` in place. It replaces ``hidden[path]``, the embedding, ``n + 1``, the slots' add, the rotary
    gather and the length's add. hidden (T, D); path, tokens (D1,) long; n (1,) or 0-d long; table (V, D);
    rope (2, S, hd) (any trailing size-1 dimensions); length (1,) long, written in place."""
    hidden, path, tokens = hidden.contiguous(), path.contiguous(), tokens.contiguous()
    d1, d = path.numel(), hidden.shape[-1]
    rope, outs = _path_outputs(hidden, d1, table, rope)
    _path_inputs_kernel[(1,)](
        hidden, path, tokens, n, hidden if table is None else table.contiguous(), rope, length, *outs, d,
        rope.shape[1], D1=d1, BLOCK_R=triton.next_power_of_2(d1), **_path_blocks(d, rope, table),
    )  # fmt: skip
    return outs


def _path_outputs(
    hidden: torch.Tensor, d1: int, table: torch.Tensor | None, rope: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``path_inputs``' rotary table as its kernel reads it (2, S, hd) and its five outputs, allocated."""
    s, d = rope.shape[1], hidden.shape[-1]
    rope = rope.reshape(2, s, -1).contiguous()
    rows = hidden.new_empty(d1, d)
    emb = hidden.new_empty(0, d) if table is None else table.new_empty(d1, d)
    cos_sin = rope.new_empty(2, d1, rope.shape[-1])
    slots = torch.empty(d1, dtype=torch.long, device=hidden.device)
    return rope, (rows, emb, cos_sin, slots, slots.new_empty(1))


def _path_blocks(d: int, rope: torch.Tensor, table: torch.Tensor | None) -> dict:
    """``_store_path_inputs``' constants (but D1) for rows of D over the (2, S, hd) rotary table."""
    hd = rope.shape[-1]
    return dict(
        HD=hd, HAS_TABLE=table is not None, BLOCK_D=triton.next_power_of_2(d), BLOCK_HD=triton.next_power_of_2(hd)
    )


@path_inputs.register_fake
def _fake_path_inputs(hidden, path, tokens, n, table, rope, length):
    d1, d = path.numel(), hidden.shape[-1]
    hd = rope.numel() // (2 * rope.shape[1])
    emb = hidden.new_empty(0, d) if table is None else table.new_empty(d1, d)
    long = torch.empty(d1, dtype=torch.long, device=hidden.device)
    return hidden.new_empty(d1, d), emb, rope.new_empty(2, d1, hd), long, long.new_empty(1)


@triton.jit
def _accept_move_kernel(
    Keys,  # (T, C) argmax_keys: the backbone's argmax after each node
    Tokens,  # (T,) the tree's tokens
    Ret,  # (P, D1) the tree's root-to-leaf paths
    Path,  # (D1,) the accepted path, clamped
    Out,  # (D1 + 1,) [n, emitted tokens]
    Root,  # () the bonus token
    K,  # (L, S, W) the backbone's caches of one sequence, W = n_kv * hd contiguous
    V,
    CacheLen,  # () the backbone's cache length (read only: ``cache_kernels.advance`` is the next launch)
    Hidden,  # (T, D), then the prefix layer's inputs and outputs as ``_path_inputs_kernel`` has them
    Table,
    Rope,
    Len,
    HOut,
    EOut,
    CsOut,
    Slots,
    Start,
    P,
    C,
    W,
    stride_l,
    stride_s,
    D,
    S,
    D1: tl.constexpr,
    HD: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    # Every program takes the acceptance itself (a grid has no barrier to wait for one program's): a few KB of keys
    # from L2, and a dependent load round less than reading the path program 0 would write.
    j = tl.arange(0, BLOCK_J)
    layer = tl.program_id(0).to(tl.int64) - 1
    if layer < 0:  # program 0: greedy_accept's writes, then path_inputs'
        length = tl.load(Len)  # loaded first: it waits for nothing
        n, path, emitted, bonus = _greedy_path(Keys, Tokens, Ret, P, C, D1, BLOCK_P, BLOCK_J, BLOCK_C)
        _store_accepted(Path, Out, Root, n, path, emitted, bonus, j, D1)
        _store_path_inputs(
            Hidden, Table, Rope, Len, HOut, EOut, CsOut, Slots, Start, length, path, emitted, n, j, D, S, D1, HD,
            HAS_TABLE, BLOCK_D, BLOCK_HD,
        )  # fmt: skip
    else:  # program l + 1: layer l's move (``_move_path_kernel``'s); no other program touches its slots
        base = tl.load(CacheLen)
        path = _greedy_path(Keys, Tokens, Ret, P, C, D1, BLOCK_P, BLOCK_J, BLOCK_C)[1]
        _move_slots(K, V, layer * stride_l, base, path, j, D1, W, stride_s, BLOCK_W)


@torch.library.custom_op("medusa_llama::accept_move", mutates_args=("out", "root", "k_cache", "v_cache", "length"))
def accept_move(
    keys: torch.Tensor,
    tokens: torch.Tensor,
    retrieve: torch.Tensor,
    out: torch.Tensor,
    root: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    hidden: torch.Tensor,
    table: torch.Tensor | None,
    rope: torch.Tensor,
    length: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Medusa step's greedy acceptance, the commit's KV move and the prefix layer's inputs in one launch, for one
    sequence: ``path = greedy_accept(keys, tokens, retrieve, out, root)``, then ``cache_kernels.move_path(k_cache,
    v_cache, cache_len, path)``, then ``path_inputs(hidden, path, out[1:], out[:1], table, rope, length)`` (their
    arguments, as they have them, with one row: keys (T, C), tokens (T,), out (D+2,), root 0-d, caches
    (L, 1, S, n_kv, hd), cache_len 0-d). Returns ``(path, *path_inputs' five outputs)``. The backbone's cache
    length is left as it was: ``cache_kernels.advance(cache_len, out[0])`` is the next launch (every program of the
    move reads the old length; Triton has no grid-wide barrier to order the advance after them).

    L + 1 programs: each takes the acceptance (``_greedy_path``) itself; program 0 writes it and the prefix layer's
    inputs, program l + 1 moves layer l's accepted slots. Three launches before (2-5 us of GPU time each on an H200,
    plus the gap between launches in a CUDA graph) -> one."""
    n_layers, b, _, n_kv, hd = k_cache.shape
    assert keys.dim() == 2 and b == 1, "one sequence"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == hd and k_cache.stride(4) == 1
    (p, d1), d = retrieve.shape, hidden.shape[-1]
    hidden = hidden.contiguous()
    rope, outs = _path_outputs(hidden, d1, table, rope)
    path = torch.empty(d1, dtype=torch.long, device=tokens.device)
    _accept_move_kernel[(n_layers + 1,)](
        keys.contiguous(), tokens.contiguous(), retrieve.contiguous(), path, out, root, k_cache, v_cache, cache_len,
        hidden, hidden if table is None else table.contiguous(), rope, length, *outs,
        p, keys.shape[-1], n_kv * hd, k_cache.stride(0), k_cache.stride(2), d, rope.shape[1],
        BLOCK_W=triton.next_power_of_2(n_kv * hd), **_accept_blocks(keys, retrieve), **_path_blocks(d, rope, table),
    )  # fmt: skip
    return (path, *outs)


@accept_move.register_fake
def _(keys, tokens, retrieve, out, root, k_cache, v_cache, cache_len, hidden, table, rope, length):
    path = tokens.new_empty(retrieve.shape[1])
    return (path, *_fake_path_inputs(hidden, path, path, path, table, rope, length))
