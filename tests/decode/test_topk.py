"""The Triton top-k (``decode/topk.py``) equals ``torch.topk``: the values at its indices exactly, the indices
themselves where values are distinct, and equal values lowest column first (a stable descending sort's order).

On a CPU the kernels run in Triton's interpreter (one Python call per program): N = 8192 is one chunk, 8193 two
and 49152 six; for time, the long rows there on up to 3 rows (16 on a GPU) and the full vocabulary on one.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from medusa_llama.decode import topk  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
if not ON_GPU and type(topk._chunk_topk_kernel).__name__ != "InterpretedFunction":
    pytest.skip("Triton was imported before conftest set TRITON_INTERPRET=1", allow_module_level=True)

CHUNK = topk.CHUNK
SIZES = [7, 100, 8192, 8193, 49152]
KS = [1, 2, 5, 10]


def run(x: torch.Tensor, k: int) -> torch.Tensor:
    return topk.triton_topk_indices(x, k, chunk=CHUNK)


def stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """The reference indices: best first, equal values lowest column first."""
    return torch.sort(x.float(), dim=-1, descending=True, stable=True).indices[..., :k]


def distinct(rows: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of n distinct values, in random order (bf16: distinct bit patterns of finite numbers, not -0.0)."""
    if dtype == torch.float32:
        return torch.stack([torch.randperm(n) - n / 2 for _ in range(rows)]).float()
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    pool = bits[bits.view(dtype).isfinite() & (bits != -(2**15))]
    pool = pool[torch.randperm(len(pool))]  # one shuffle, each row a different rotation of it
    return torch.stack([pool.roll(997 * r)[:n] for r in range(rows)]).view(dtype)


def check(x: torch.Tensor, k: int, exact_indices: bool) -> None:
    idx = run(x, k)
    ref = x.topk(k, dim=-1)
    assert idx.shape == ref.indices.shape and idx.dtype == torch.long
    assert torch.equal(x.gather(-1, idx), ref.values)
    if exact_indices:
        assert torch.equal(idx, ref.indices)
    assert torch.equal(idx, stable_topk(x, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_matches_torch_topk(rows, n, dtype):
    if not ON_GPU and (n > 2 * CHUNK and rows > 1 or n > 1000 and rows > 3):
        pytest.skip("interpreter time")
    torch.manual_seed(rows * 100_000 + n)
    x = distinct(rows, n, dtype).to(DEV)
    for k in KS:
        if k <= n:
            check(x, k, exact_indices=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [100, 8193])
def test_ties_lowest_index_first(n, dtype):
    torch.manual_seed(n)
    x = torch.randint(-3, 3, (3, n), device=DEV).to(dtype)  # each value on thousands of columns
    x[0] = 0.0
    x[0, n // 2 :: 7] = -0.0  # equal to 0.0: still ties by column
    x[1, -1] = 5.0  # the best column in the last chunk, the next ones in the first
    x[2] = float("-inf")
    x[2, n - 3] = 1.0  # one finite value, then -inf columns from 0 on
    for k in KS:
        check(x, k, exact_indices=False)


def test_randn_logits_and_layouts():
    """Logits-like bf16 values (ties at the top are likely), a leading batch shape, a strided row view."""
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 3000, device=DEV) * 3).bfloat16()
    check(x, 10, exact_indices=False)
    view = x.reshape(8, 3000)[:, 100:2100]  # rows 3000 apart, not contiguous
    check(view, 7, exact_indices=False)


def test_edge_cases():
    x = torch.randn(4, 50, device=DEV)
    assert run(x, 0).shape == (4, 0)
    assert run(x[:0], 3).shape == (0, 3)
    assert torch.equal(run(x, 50), stable_topk(x, 50))
    with pytest.raises(ValueError):
        run(x, 51)


def test_custom_op_and_fallback():
    x = torch.randn(3, 1000, device=DEV)
    assert torch.equal(torch.ops.medusa_llama.topk_indices(x, 4), x.topk(4).indices)
    assert torch.equal(topk.topk_indices(x, 4), x.topk(4).indices)  # CPU: torch.topk itself; GPU: the kernels
    with FakeTensorMode():
        out = torch.ops.medusa_llama.topk_indices(torch.empty(2, 5, 1000), 6)
    assert out.shape == (2, 5, 6) and out.dtype == torch.long


@pytest.mark.parametrize("n", [100, 8193])
@pytest.mark.parametrize("batch", [1, 3])
def test_out_slices_of_one_buffer(batch, n):
    """``out``: each call writes its (batch, rows, k) columns into a slice of one (batch, C) buffer (the proposal's
    depths, contiguous but for the first stride); one chunk or two (the merge kernel) per row. The rest of the
    buffer is untouched; the CPU path (torch.topk) writes the same."""
    torch.manual_seed(n)
    xs = [distinct(batch * rows, n, torch.float32).view(batch, rows, n) for rows in (1, 4, 3)]
    ks = [3, 2, 5]
    width = sum(x.shape[1] * k for x, k in zip(xs, ks, strict=True))
    for fn in (lambda x, k, out: topk.triton_topk_indices(x, k, chunk=CHUNK, out=out), topk.topk_indices):
        buf = torch.full((batch, width + 2), -7, dtype=torch.long)
        at = 1
        for x, k in zip(xs, ks, strict=True):
            part = buf[:, at : at + x.shape[1] * k].view(batch, x.shape[1], k)
            assert fn(x, k, out=part) is part
            assert torch.equal(part, stable_topk(x, k))
            at += x.shape[1] * k
        assert (buf[:, 0] == -7).all() and (buf[:, -1] == -7).all()
    with pytest.raises(ValueError, match="contiguous"):
        topk.triton_topk_indices(xs[1], 2, out=torch.empty(batch, 2, 4, dtype=torch.long).transpose(1, 2))


# -- the proposal's projection and top-k in one launch (``project_topk``) ----------------------------------------


def project_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """The two steps it replaces: the logits in the weight's dtype (``heads.project_draft``), then the columns in
    ``topk_indices``' order (equal values lowest column first)."""
    return stable_topk(F.linear(x.to(weight.dtype), weight, bias), k)


def projection(rows: int, n: int, dtype: torch.dtype, bias: bool, d: int = 72):
    """Head states (rows, d) and a projection (n, d) (+ bias) of logits-like spread, with the columns the merge
    must get right: row 0's best in the last (partial) chunk, row 1's best tied on columns 0 and n - 2.

    Random values on a grid (quarters, 64ths): every logit is an exact fp32 sum, the same in any summation order
    (the kernel's tiles, a CPU or GPU GEMM's), so the columns can be asked for exactly, ties included."""
    x = ((torch.randn(rows, d, device=DEV) * 4).round() / 4).to(dtype)
    w = ((torch.randn(n, d, device=DEV) * 0.3 * 64).round() / 64).to(dtype)
    w[-1] = x[0] * 0.5
    if rows > 1:
        w[0] = w[-2] = x[1] * 0.5
    b = (torch.randn(n, device=DEV) * 0.1).to(dtype) if bias else None
    if bias and rows > 1:
        b[0] = b[-2]
    return x, w, b


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("n", [333, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 10])
def test_project_topk_equals_the_projection_then_topk(rows, dtype, n, bias):
    """Random states and weights, K (72) and N (333: 3 chunks, 1000: 8) not multiples of the tiles: the columns of
    the PyTorch path's logits, ties lowest column first; fp32 and bf16 (logits rounded to bf16, many near ties)."""
    torch.manual_seed(rows * 1000 + n)
    x, w, b = projection(rows, n, dtype, bias)
    for k in (1, 2, 9):
        ref = project_ref(x, w, b, k)
        got = topk.triton_project_topk(x, w, b, k)
        assert torch.equal(got, ref), (k, got, ref)
        assert got[0, 0] == n - 1
        if rows > 1:
            assert got[1, :2].tolist() == [0, n - 2][:k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_topk_loops_over_row_tiles(dtype, monkeypatch):
    """More rows than one tl.dot tile and than one merge tile hold (tiles shrunk: 16 rows, 64 keys): the loops over
    both, with a batch dimension and states of another dtype than the weights': fp32 states off the grid (rounded
    to the bf16 weights' dtype in the kernel, as ``.to``), bf16 ones for fp32 weights."""
    monkeypatch.setattr(topk, "PROJECT_MAX_M", 16)
    monkeypatch.setattr(topk, "MERGE_TILE", 64)
    torch.manual_seed(5)
    x, w, b = projection(40, 300, dtype, bias=True)
    states = x.float() + torch.randn(x.shape, device=DEV) / 64 if dtype == torch.bfloat16 else x.bfloat16()
    states = states.view(4, 10, -1)
    for k in (3, 9):
        got = topk.triton_project_topk(states, w, b, k, block_n=32)
        assert got.shape == (4, 10, k) and torch.equal(got, project_ref(states, w, b, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_topk_ties_lowest_column_first(dtype):
    """Small integers: the logits are exact whatever the summation order, and each value is on many columns of
    several chunks (32 columns each here); a row of zeros ties everywhere (columns 0 .. k - 1)."""
    torch.manual_seed(3)
    x = torch.randint(-2, 3, (7, 40), device=DEV).to(dtype)
    x[3] = 0
    w = torch.randint(-1, 2, (300, 40), device=DEV).to(dtype)
    for k in (1, 2, 9):
        got = topk.triton_project_topk(x, w, None, k, block_n=32)
        assert torch.equal(got, project_ref(x, w, None, k))
        assert got[3].tolist() == list(range(k))


def test_project_topk_counter_is_back_at_zero():
    """The last program zeroes the count after its merge: every counter is 0 after a call, the owner keeps its
    slot, and a second call (another ``out``, the same owner's counter) writes the same columns."""
    torch.manual_seed(4)
    x, w, _ = projection(7, 1000, torch.float32, bias=False)
    out = torch.full((7, 9), -1, dtype=torch.long, device=DEV)
    assert topk.triton_project_topk(x, w, None, 9, out=out) is out
    assert torch.equal(out, project_ref(x, w, None, 9))
    counter = topk._counter(out.device, out.data_ptr())
    table = topk._COUNTERS[out.device]
    assert int(counter) == 0 and not table.any()
    again = torch.full_like(out, -1)
    topk.triton_project_topk(x, w, None, 9, out=again, owner=out)
    assert torch.equal(again, out) and not table.any()
    assert topk._counter(out.device, out.data_ptr()).data_ptr() == counter.data_ptr()  # kept, not made again
    assert topk._COUNTERS[out.device] is table


def test_project_topk_counter_slots(monkeypatch):
    """Owners take the table's slots in turn; past its size the oldest owner's slot is reused (a table of two)."""
    monkeypatch.setattr(topk, "COUNTER_SLOTS", 2)
    monkeypatch.setattr(topk, "_COUNTERS", {})
    monkeypatch.setattr(topk, "_SLOTS", {})
    monkeypatch.setattr(topk, "_next_slot", 0)
    dev = torch.device(DEV)
    slots = [topk._counter(dev, owner) for owner in (11, 22, 11, 33)]
    base = topk._COUNTERS[dev].data_ptr()
    assert [(s.data_ptr() - base) // 4 for s in slots] == [0, 1, 0, 0]  # 33 took 11's slot, the oldest's
    assert list(topk._SLOTS) == [(dev, 22), (dev, 33)]
    x, w, _ = projection(3, 200, torch.float32, bias=False)
    for owner in range(3):  # more owners than slots, one after another: each call merges
        got = topk.triton_project_topk(x, w, None, 4, owner=torch.empty(owner + 1, device=DEV), block_n=32)
        assert torch.equal(got, project_ref(x, w, None, 4))
    assert not topk._COUNTERS[dev].any()


def test_project_topk_fits_and_the_custom_op():
    """``project_topk`` writes nothing and says so where the kernel does not apply; the op has a fake kernel."""
    x, w, b = projection(3, 200, torch.bfloat16, bias=True)
    out = torch.full((3, 5), -1, dtype=torch.long, device=DEV)
    for args in ((x, w.t().contiguous().t(), b, 5), (x, w[:, :64], b, 5), (x, w, b, 0), (x, w, b, 201)):
        assert not topk.project_topk(*args, out=out[:, : args[3]]) and (out == -1).all()
    assert not topk.project_topk(x, w.to(torch.int8), None, 5, out)
    assert topk.project_topk(x, w, b, 5, out) and torch.equal(out, project_ref(x, w, b, 5))
    with FakeTensorMode():
        fake = torch.empty(2, 4, 72, dtype=torch.bfloat16)
        torch.ops.medusa_llama.project_topk(fake, torch.empty(100, 72, dtype=torch.bfloat16), None, 3,
                                            torch.empty(2, 4, 3, dtype=torch.long), fake)  # fmt: skip
