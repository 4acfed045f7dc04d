"""The KV-cache kernels of ``cache_kernels.py`` equal their PyTorch references (on a CPU through Triton's
interpreter): the commit's slot move and cache-length advance, for one sequence and for a batch of them."""

import pytest
import torch
from test_prefix import kernel_device

from medusa_llama.decode.model import commit_cache

L, S, N_KV, HD = 3, 40, 3, 24  # odd sizes: a slot row of 72 values, not a power of two


def _path(g: torch.Generator, d1: int, n: int) -> torch.Tensor:
    """A path of n + 1 accepted nodes, root first and ascending with path[i] >= i (a tree's nodes sit deeper than
    their depth), then padding: -1 or 0 (a clamped path)."""
    nodes = torch.randperm(3 * d1, generator=g)[:n] + 1  # distinct node indices of a tree of 3 D1 + 1 nodes
    path = torch.cat([torch.zeros(1, dtype=torch.long), nodes.sort().values])
    pad = -1 if torch.rand(1, generator=g).item() < 0.5 else 0
    return torch.cat([path, torch.full((d1 - n - 1,), pad, dtype=torch.long)])


def _reference(cache: torch.Tensor, cache_len: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """Row b's slots cache_len[b] + j take the ORIGINAL contents of cache_len[b] + max(path[b, j], 0)."""
    out = cache.clone()
    for b in range(cache.shape[1]):
        c = int(cache_len[b])
        for j, p in enumerate(path[b].tolist()):
            out[:, b, c + j] = cache[:, b, c + max(p, 0)]
    return out


def _overlaps(path: torch.Tensor) -> bool:
    """Some slot is read by one row of the path and written by another (j != k with path[j] == k)."""
    d1 = path.shape[-1]
    return any(0 <= p < d1 and p != j for row in path.view(-1, d1).tolist() for j, p in enumerate(row))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("d1", [2, 5, 7])
def test_commit_kernel_equals_torch(batch, d1, dtype):
    dev = kernel_device()
    g = torch.Generator().manual_seed(batch * 10 + d1)
    caches = [torch.randn(L, batch, S, N_KV, HD, generator=g).to(dtype) for _ in range(2)]
    lengths = torch.randint(0, S - 3 * d1 - 1, (batch,), generator=g)
    ns = torch.randint(0, d1, (batch,), generator=g)
    ns[0] = d1 - 1  # one row keeps its whole path
    path = torch.stack([_path(g, d1, int(n)) for n in ns])  # (B, D1)
    if d1 > 2:
        path[-1, 1 : d1 - 1] = torch.arange(2, d1)  # chained overlaps: node j + 1 moves into slot j, then slot j + 1
        ns[-1] = d1 - 2
    assert _overlaps(path) or d1 == 2
    active = torch.rand(batch, generator=g) < 0.7
    out = torch.zeros(batch, d1 + 2, dtype=torch.long)
    out[:, 0] = ns  # n read through a strided view, as the decoders pass out[:, 0]
    n = out[:, 0]
    want = [_reference(c, lengths, path) for c in caches]
    results = []
    for fused in (False, True):
        k, v, length = (x.clone().to(dev) for x in (*caches, lengths))
        if batch == 1:  # the single-sequence form: 0-d length and n, (D1,) path, no active mask
            commit_cache(k, v, length[0], path[0].to(dev), n[0].to(dev), fused=fused)
        else:
            commit_cache(k, v, length, path.to(dev), n.to(dev), active.to(dev), fused)
        results.append((k.cpu(), v.cpu(), length.cpu()))
    advanced = lengths + (ns + 1) * (active if batch > 1 else True)
    for k, v, length in results:
        assert torch.equal(k, want[0]) and torch.equal(v, want[1])
        assert torch.equal(length, advanced)


def test_commit_of_the_root_alone_only_advances():
    """Vanilla decoding's commit (a path of the root alone) moves nothing and advances each active row by one."""
    dev = kernel_device()
    k, v = (torch.randn(L, 2, S, N_KV, HD, generator=torch.Generator().manual_seed(i)).to(dev) for i in (0, 1))
    before = k.clone(), v.clone()
    length = torch.tensor([4, 9], device=dev)
    zeros = torch.zeros(2, dtype=torch.long, device=dev)
    commit_cache(k, v, length, zeros[:, None], zeros, torch.tensor([True, False], device=dev), fused=True)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    assert length.tolist() == [5, 9]


def test_the_reference_sees_the_overlap():
    """The check above can fail: moving the path's rows one by one, in place and in reverse order, reads slots
    already overwritten and gives another cache."""
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(1, 1, S, 1, 4, generator=g)
    length, path = torch.tensor([5]), torch.tensor([[0, 2, 3, 0]])
    naive = cache.clone()
    for j in reversed(range(4)):
        naive[:, 0, 5 + j] = naive[:, 0, 5 + int(path[0, j])]
    assert not torch.equal(naive, _reference(cache, length, path))
