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

``project_topk`` does a proposal depth's projection (the draft vocabulary's logits, a GEMM of a few rows) and its
top-k in one launch instead of two: a program per chunk of columns computes its logits, rounded as the GEMM's, and
its k best keys per row (step 1 on registers, not on loaded logits); the last program to finish, found by an atomic
count, takes the merge of step 2. The count is an int32 that the last program zeroes again: made once per device
(outside a CUDA graph), never zeroed by a separate launch.

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
_DEAD = _constexpr(-(2**63))  # the key of a dead slot: below every real key
_LOW = _constexpr(2**31 - 1)  # low word = column ^ _LOW = _LOW - column: lower column of two equal values, larger key


@_jit
def _keys(X, stride_row, row, cols, N):
    """The int64 keys of ``X[row, cols]``; dead past N."""
    x = tl.load(X + row * stride_row + cols, mask=cols < N, other=0.0).to(tl.float32)
    return _value_keys(x, cols, cols < N)


@_jit
def _value_keys(x, cols, live):
    """The int64 keys of fp32 values ``x`` at columns ``cols`` (broadcast together); dead where not ``live``."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 equals +0.0: one key, so that the tie goes to the lower column
    b = x.to(tl.int32, bitcast=True)
    ordered = b ^ ((b >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits, so int order = float order
    key = (ordered.to(tl.int64) << 32) | (cols ^ _LOW).to(tl.int64)
    return tl.where(live, key, _DEAD)


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


def triton_topk_indices(x: torch.Tensor, k: int, chunk: int = CHUNK, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of ``topk_indices`` on any device Triton runs on (its interpreter too); ``chunk``: columns
    per stage-1 program, a power of two. ``out``: where to write, as ``_out_layout`` allows (a slice of a wider
    buffer; default a new tensor)."""
    n = x.shape[-1]
    x2, out, inner, stride_outer = _rows_and_out(x, k, n, out, "the row length")
    if n >= 2**31:
        raise ValueError(f"rows of {n} columns: at most 2**31 - 1")
    rows = x2.shape[0]
    if rows == 0 or k == 0:
        return out
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


@_jit
def _rounded(x, dt: tl.constexpr, BF16: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dt``, as fp32 values. bfloat16 by its bits: Triton's interpreter
    truncates an fp32 -> bfloat16 cast (the GPU rounds), and the keys must not depend on where the kernel runs."""
    if BF16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # finite values; the carry may round up into the exponent
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


@_jit
def _project_topk_kernel(
    X,  # (M, D) head states, rows x_stride apart
    W,  # (N, D) the projection's weight (out, in), contiguous
    Bias,  # (N,) (read with HAS_BIAS)
    Keys,  # (M, programs * K) int64 scratch: each program's K best keys of each row
    Out,  # (..., K) long: row r = outer * inner + j at outer * stride_outer + j * K
    Counter,  # int32, 0 between launches: the programs done with their chunk
    x_stride,
    N,
    inner,
    stride_outer,
    M: tl.constexpr,  # constexpr: loop trip counts (Triton's interpreter needs them so)
    D: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAST_X: tl.constexpr,
    BF16: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MERGE_M: tl.constexpr,
    MERGE_C: tl.constexpr,
):
    chunk, programs = tl.program_id(0), tl.num_programs(0)
    n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's columns
    n_ok = n < N
    dt = W.dtype.element_ty
    c = programs * K  # candidates per row
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D
            x = tl.load(X + m[:, None] * x_stride + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if CAST_X:  # the PyTorch path's ``state.to(weight.dtype)``
                x = _rounded(x.to(tl.float32), dt, BF16).to(dt)
            w = tl.load(W + n[None, :] * D + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # W^T tile
            if DOT_F32:  # fp32 weights ("ieee"), or 16-bit ones in the interpreter, which has no 16-bit tl.dot
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
            else:  # 16-bit operands, exact products, fp32 accumulation: the GEMM's arithmetic
                acc += tl.dot(x, w)
        if HAS_BIAS:
            acc += tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        logits = _rounded(acc, dt, BF16)  # rounded once to the weight's dtype, as the GEMM's output is
        keys = _value_keys(logits, n[None, :], m_ok[:, None] & n_ok[None, :])  # (BLOCK_M, BLOCK_N)
        at = Keys + m * c + chunk * K
        for i in tl.static_range(K):
            best = tl.max(keys, 1)
            keys = tl.where(keys == best[:, None], _DEAD, keys)
            tl.store(at + i, best, mask=m_ok)
    # The last program to finish merges. In each program the barrier orders all its threads' key stores before
    # the count's release (one thread's atomic); the last program's acquire reads the count every release added
    # to, so all programs' keys are visible to its loads (after the barrier that hands the count to its threads).
    tl.debug_barrier()
    done = tl.atomic_add(Counter, 1, sem="acq_rel", scope="gpu")
    if done == programs - 1:
        j = tl.arange(0, MERGE_C)
        for r0 in range(0, M, MERGE_M):
            r = r0 + tl.arange(0, MERGE_M)
            r_ok = r < M
            live = r_ok[:, None] & (j < c)[None, :]
            # .cg: from L2, not from a line of the scratch this SM's L1 may hold from an earlier launch
            keys = tl.load(Keys + r[:, None] * c + j[None, :], mask=live, other=_DEAD, cache_modifier=".cg")
            out = Out + (r // inner) * stride_outer + (r % inner) * K
            for i in tl.static_range(K):
                best = tl.max(keys, 1)
                keys = tl.where(keys == best[:, None], _DEAD, keys)
                tl.store(out + i, (best & _LOW) ^ _LOW, mask=r_ok)
        tl.atomic_xchg(Counter, 0)  # ready for the next launch (a CUDA graph's replay: nothing else zeroes it)


PROJECT_BLOCK_N = 128
"""Columns per ``project_topk`` program (the draft vocabulary's 8192: 64 programs, each reading 128 weight rows)."""
PROJECT_BLOCK_K = 64
"""The K tile of ``project_topk``'s products."""
PROJECT_MAX_M = 64
"""The most rows one ``tl.dot`` tile of ``project_topk`` holds (more rows: a loop over tiles of this many)."""
PROJECT_NUM_WARPS = 4
"""Warps per ``project_topk`` program."""
MERGE_TILE = 4096
"""The most keys ``project_topk``'s merge holds at once (rows x candidates per row; more rows: a loop)."""
MERGE_MAX = 16384
"""The most candidates per row (programs x k, to a power of two) ``project_topk`` merges; more: not fused."""
COUNTER_SLOTS = 1024
"""Counters kept per device for ``project_topk``'s merges: one per caller (``owner``), reused round robin."""
_COUNTERS: dict[torch.device, torch.Tensor] = {}  # device -> (COUNTER_SLOTS,) int32, zeroed once
_SLOTS: dict[tuple[torch.device, int], int] = {}  # (device, owner's address) -> its slot, oldest first
_next_slot = 0


def _counter(device: torch.device, owner: int) -> torch.Tensor | None:
    """The launch counter of ``owner`` (an address) on ``device``: one int32 of a table zeroed once, at the first
    call on the device; None where that first call is a CUDA-graph capture (zeroing it there would be a node the
    graph replays). A new owner takes the next slot, also while capturing: the table is made, not grown."""
    global _next_slot
    table = _COUNTERS.get(device)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        table = _COUNTERS[device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # zeroed before a launch on any stream reads it (once per device)
    key = (device, owner)
    slot = _SLOTS.get(key)
    if slot is None:
        if len(_SLOTS) >= COUNTER_SLOTS:  # forget the oldest owner: its slot is reused below in turn
            del _SLOTS[next(iter(_SLOTS))]
        slot = _SLOTS[key] = _next_slot
        _next_slot = (_next_slot + 1) % COUNTER_SLOTS
    return table[slot : slot + 1]


def _project_tiles(rows: int, n: int, d: int, k: int, block_n: int) -> tuple[int, int, int, int] | None:
    """(BLOCK_M, programs, MERGE_M, MERGE_C) of ``project_topk`` for these shapes; None beyond its limits."""
    if n >= 2**31:
        return None
    programs = triton.cdiv(n, block_n)
    merge_c = max(16, triton.next_power_of_2(programs * k))
    if merge_c > MERGE_MAX:
        return None
    block_m = min(PROJECT_MAX_M, max(16, triton.next_power_of_2(rows)))  # tl.dot: at least 16 rows
    merge_m = min(triton.next_power_of_2(rows), max(1, MERGE_TILE // merge_c))
    return block_m, programs, merge_m, merge_c


def triton_project_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    out: torch.Tensor | None = None,
    owner: torch.Tensor | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``topk_indices(F.linear(x.to(weight.dtype), weight, bias), k)`` in one launch, on any device Triton runs on
    (its interpreter too). x (..., D); weight (N, D) contiguous, bfloat16 / float16 / float32; bias (N,) or None.
    ``out``: as ``triton_topk_indices``'s. ``owner``: a tensor whose address names the caller, so that callers
    that may run at once (on other streams) keep distinct counters (default: ``out``). ``block_n``: columns per
    program, a power of two >= 16 (default ``PROJECT_BLOCK_N``). Raises ValueError for shapes beyond the kernel."""
    n, d = weight.shape
    x2, out, inner, stride_outer = _rows_and_out(x, k, n, out, "the projection's columns")
    rows = x2.shape[0]
    if rows == 0 or k == 0:
        return out
    block_n = block_n or PROJECT_BLOCK_N
    tiles = _project_tiles(rows, n, d, k, block_n)
    if tiles is None or x.shape[-1] != d or not weight.is_contiguous():
        raise ValueError(f"project_topk: no kernel for x {tuple(x.shape)}, weight {tuple(weight.shape)}, k = {k}")
    counter = _counter(x.device, (out if owner is None else owner).data_ptr())
    if counter is None:  # the first call on this device, under capture: the two launches, graph-safe all the same
        return triton_topk_indices(torch.nn.functional.linear(x.to(weight.dtype), weight, bias), k, out=out)
    block_m, programs, merge_m, merge_c = tiles
    keys = torch.empty(rows, programs * k, dtype=torch.long, device=x.device)
    fp32 = weight.dtype == torch.float32
    _project_topk_kernel[(programs,)](
        x2, weight, weight if bias is None else bias.contiguous(), keys, out, counter,
        x2.stride(0), n, inner, stride_outer, M=rows, D=d, K=k, HAS_BIAS=bias is not None,
        CAST_X=x.dtype != weight.dtype, BF16=weight.dtype == torch.bfloat16,
        DOT_F32=fp32 or _interpreted(), PRECISION="ieee" if fp32 else "tf32",  # tf32: the interpreter's 16-bit
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(PROJECT_BLOCK_K, max(16, triton.next_power_of_2(d))),
        MERGE_M=merge_m, MERGE_C=merge_c, num_warps=PROJECT_NUM_WARPS,
    )  # fmt: skip
    return out


def _rows_and_out(
    x: torch.Tensor, k: int, n: int, out: torch.Tensor | None, columns: str
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """What both launches check and prepare: k within 0..n (``columns`` says what n counts); x (..., D) as rows
    (rows, D) of unit stride; ``out`` (a new (..., k) long tensor where None) and its ``_out_layout``."""
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} must be within 0..{n} ({columns})")
    d = x.shape[-1]
    x2 = x.reshape(x.numel() // d if d else 0, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(*x.shape[:-1], k, dtype=torch.long, device=x.device)
    return x2, out, *_out_layout(out, k)


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


@torch.library.custom_op("medusa_llama::project_topk", mutates_args=("out",))
def _project_topk_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, out: torch.Tensor, owner: torch.Tensor
) -> None:
    triton_project_topk(x, weight, bias, k, out=out, owner=owner)


@_project_topk_op.register_fake
def _(x, weight, bias, k, out, owner):
    return None


_PROJECT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when Triton was imported)."""
    return type(_project_topk_kernel).__name__ == "InterpretedFunction"


def project_topk_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> bool:
    """Whether ``project_topk`` runs its kernel on these inputs: Triton, CUDA tensors (any under Triton's
    interpreter), a bfloat16 / float16 / float32 contiguous weight, shapes within ``_project_tiles``' limits."""
    if triton is None or weight.dim() != 2 or not weight.is_contiguous() or not x.dtype.is_floating_point:
        return False
    n, d = weight.shape
    if d == 0 or x.shape[-1] != d or not 0 < k <= n or weight.dtype not in _PROJECT_DTYPES:
        return False
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        return False
    if weight.device != x.device or not (x.is_cuda or _interpreted()):
        return False
    return _project_tiles(max(x.numel() // d, 1), n, d, k, PROJECT_BLOCK_N) is not None


def project_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    out: torch.Tensor,
    owner: torch.Tensor | None = None,
) -> bool:
    """``topk_indices(F.linear(x.to(weight.dtype), weight, bias), k, out=out)`` in one launch: the proposal's
    projection and top-k of a depth (``proposal.py``). Returns False, writing nothing, where the kernel does not
    apply (``project_topk_fits``): the caller runs the two steps then. ``owner``: see ``triton_project_topk``.

    One program per chunk of ``PROJECT_BLOCK_N`` columns computes all rows' logits of its chunk (fp32 accumulation,
    rounded to the weight's dtype as the GEMM's output is), takes each row's k best keys (``_value_keys``: equal
    values lowest column first) into a scratch buffer, and counts itself done on an int32 counter; the last one to
    finish merges all chunks' keys into ``out`` and zeroes the counter for the next launch. The counter is one slot
    of a per-device table zeroed once (``_counter``), so a CUDA graph replays the launch alone."""
    if not project_topk_fits(x, weight, bias, k):
        return False
    _project_topk_op(x, weight, bias, k, out, out if owner is None else owner)
    return True
