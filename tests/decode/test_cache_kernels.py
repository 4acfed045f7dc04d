"""The KV-cache kernels of ``cache_kernels.py`` equal their PyTorch references (on a CPU through Triton's
interpreter): the commit's slot move and cache-length advance, for one sequence and for a batch of them; and the
Medusa step's one launch for the acceptance, the move and the prefix layer's inputs (``kernels.accept_move``)
equals the rule, the move and the gathers it replaces."""

import pytest
import torch
from test_prefix import kernel_device

from medusa_llama.decode.acceptance import AcceptanceConfig, accept_into
from medusa_llama.decode.dynamic_tree import tree_tensors
from medusa_llama.decode.model import commit_cache
from medusa_llama.decode.tree import build_tree, builtin_tree

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


def _random_choices(g: torch.Generator, size: int, depth: int) -> list[list[int]]:
    """A random ``medusa_choices`` tree of ``size`` nodes up to ``depth`` deep (each new node the next rank under a
    random node that is not yet at the bottom)."""
    paths: list[tuple[int, ...]] = [()]
    children: dict[tuple[int, ...], int] = {}
    while len(paths) <= size:
        up = paths[int(torch.randint(0, len(paths), (1,), generator=g))]
        if len(up) < depth:
            children[up] = children.get(up, 0) + 1
            paths.append((*up, children[up] - 1))
    return [list(q) for q in paths[1:]]


def _random_dynamic(g: torch.Generator, size: int, depth: int):
    """A dynamic tree's step buffers (``StepTree``: a retrieve row per node) over random parents."""
    parent, level = [-1], [0]
    for i in range(1, size):
        up = int(torch.randint(0, i, (1,), generator=g))
        while level[up] == depth:
            up = parent[up]
        parent.append(up)
        level.append(level[up] + 1)
    return tree_tensors(torch.tensor(parent), torch.tensor(level), depth)


def _accept_trees():
    g = torch.Generator().manual_seed(3)
    static = [builtin_tree("tree64"), builtin_tree("chain"), [[0], [1], [2]], _random_choices(g, 40, 4)]
    return [build_tree(c) for c in static] + [_random_dynamic(g, 24, 4)]


def _rigged(tree, case: str, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree's tokens (T,) and logits (T, V) whose argmax after each node is planted: ``random``, about half the
    nodes match their parent's prediction, and the first nodes of a random path; ``longest``, the same and all the
    nodes of a deepest path (n = its depth); ``none``, no node matches (n = 0). Each prediction is tied with a
    decoy at a later column (the lower column, the prediction, must win)."""
    t, parent = tree.size, tree.parent.clamp(min=0)
    tokens = torch.randint(0, vocab, (t,), generator=g)
    pred = torch.randint(0, vocab, (t,), generator=g)
    if case != "none":  # half the nodes, then the first nodes of a random path, or all of a deepest one
        hit = torch.rand(t, generator=g) < 0.5
        pred[parent[hit]] = tokens[hit]
        length = (tree.retrieve >= 0).sum(1) - 1  # (P,) each path's nodes after the root
        row = int(length.argmax() if case == "longest" else torch.randint(0, len(length), (1,), generator=g))
        k = int(length[row]) if case == "longest" else int(torch.randint(0, int(length[row]) + 1, (1,), generator=g))
        on = tree.retrieve[row, 1 : 1 + k]
        pred[parent[on]] = tokens[on]
    if case == "none":
        tokens[1:] = (pred[parent[1:]] + 1) % vocab
    logits = torch.randn(t, vocab, generator=g).scatter(-1, pred[:, None], 9.0)
    decoy = pred + 1 + (torch.rand(t, generator=g) * (vocab - 1 - pred)).long()  # in pred + 1 .. vocab - 1
    return tokens, logits.scatter(-1, decoy.clamp(max=vocab - 1)[:, None], 9.0)


@pytest.mark.parametrize("case", ["random", "none", "longest"])
@pytest.mark.parametrize("tree", _accept_trees(), ids=["tree64", "chain", "flat", "random", "dynamic"])
@pytest.mark.parametrize("token_input", [False, True])
def test_accept_move_equals_the_rule_the_move_and_the_gathers(tree, case, token_input):
    """``kernels.accept_move`` (the acceptance, the backbone's K/V move and the prefix layer's inputs in one launch
    of L + 1 programs) against the separate steps it replaces, the PyTorch rule (``accept_into``), then the
    ``move_path`` and ``path_inputs`` kernels, and against PyTorch references of those two: out, root, path, every
    layer's K and V (the backbone's length left alone), the prefix inputs and the prefix length. bf16 logits over
    300 columns keyed in 3 chunks of 128, or in one; the prefix rows in the middle and at the end of their rotary
    table (rows past it are not written: not compared)."""
    from medusa_llama.decode import kernels
    from medusa_llama.decode.cache_kernels import move_path

    dev = kernel_device()
    tree = tree.to(dev)
    g = torch.Generator().manual_seed(tree.size * 10 + len(case))
    d1, t, vocab, d, s2 = tree.max_depth + 1, tree.size, 300, 40, 30
    deepest = int((tree.retrieve >= 0).sum(1).max()) - 1
    for at in (int(torch.randint(0, s2 - d1, (1,), generator=g)), s2 - d1 + 2):  # the prefix length
        tokens, logits = _rigged(tree, case, vocab, g)
        tokens, logits = tokens.to(dev), logits.to(dev, torch.bfloat16)
        caches = [torch.randn(L, 1, t + 12, N_KV, HD, generator=g).to(dev, torch.float16) for _ in range(2)]
        base = int(torch.randint(0, 12, (), generator=g))
        cache_len = torch.tensor(base, device=dev)
        hidden, table = torch.randn(t, d, generator=g).to(dev), torch.randn(vocab, d, generator=g).to(dev)
        table = table if token_input else None
        rope = torch.randn(2, s2, 1, 8, generator=g).to(dev)
        results = []
        for fused in (True, False):
            out, root = torch.full((d1 + 1,), -7, device=dev), torch.full((), -7, device=dev)
            k, v, length = caches[0].clone(), caches[1].clone(), torch.tensor([at], device=dev)
            if fused:
                keys = kernels.argmax_keys(logits, 128 if at < s2 - d1 else 512)  # 3 chunks, then 1
                path, *inputs = kernels.accept_move(
                    keys, tokens, tree.retrieve, out, root, k, v, cache_len, hidden, table, rope, length
                )
            else:
                path = accept_into(logits.float(), tokens, tree, AcceptanceConfig(), out, root)
                move_path(k, v, cache_len, path)
                inputs = kernels.path_inputs(hidden, path, out[1:], out[:1], table, rope, length)
            rows, emb, cos_sin, slots, start = inputs
            kept = min(d1, s2 - at)  # the rows inside the rotary table
            results.append([path, out, root, k, v, length, rows, emb, cos_sin[:, :kept], slots, start])
        for got, want in zip(*results, strict=True):
            assert torch.equal(got, want)
        path, out, root, k, v, length, rows, emb, cos_sin, slots, start = results[0]
        n = int(out[0])
        assert n == {"none": 0, "longest": deepest}.get(case, n)
        for cache, moved in zip(caches, (k, v), strict=True):
            assert torch.equal(moved.cpu(), _reference(cache.cpu(), cache_len.view(1).cpu(), path.view(1, -1).cpu()))
        assert int(start) == at and int(length) == at + n + 1 and int(cache_len) == base
        assert torch.equal(slots, at + torch.arange(d1, device=dev))
        assert torch.equal(rows, hidden[path])
        assert torch.equal(emb, table[out[1:]] if token_input else hidden[:0])
        assert torch.equal(cos_sin, rope[:, at : at + kept, 0])
