"""The Triton top-k (``decode/topk.py``) equals ``torch.topk``: the values at its indices exactly, the indices
themselves where values are distinct, and equal values lowest column first (a stable descending sort's order).

On a CPU the kernels run in Triton's interpreter (one Python call per program): N = 8192 is one chunk, 8193 two
and 49152 six; for time, the long rows there on up to 3 rows (16 on a GPU) and the full vocabulary on one.
"""

import pytest
import torch

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


@pytest.mark.parametrize("n,k", [(100, 2), (1000, 3), (8192, 9)])
def test_default_chunk_rule(n, k):
    """The default chunk (``SPLIT_CHUNK`` for k >= ``SPLIT_MIN_K`` on rows up to ``CHUNK``, else one pass) gives the
    stable top-k, ties included."""
    torch.manual_seed(n + k)
    x = (torch.randn(2, n, device=DEV) * 3).round()  # many ties
    torch.testing.assert_close(topk.triton_topk_indices(x, k), stable_topk(x, k), rtol=0, atol=0)
