"""The decode step's small Triton kernels equal their PyTorch references (on a CPU through Triton's interpreter):
the sequential heads' ``s + silu(z)`` and their whole mix with its gathers, the tree's tokens, the greedy argmax
over chunks, greedy acceptance with the step's emitted tokens, and the whole batched decoder on the kernel path;
and the kernel path cuts the step's launches (``op_count``)."""

import math
from collections import Counter

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama
from test_prefix import kernel_device

from medusa_llama.decode import prefix
from medusa_llama.decode.acceptance import AcceptanceConfig, accept_into
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.dynamic_tree import DynamicTree, StepTree
from medusa_llama.decode.op_count import count_step
from medusa_llama.decode.tree import build_tree, builtin_tree

GREEDY = GenerationConfig(max_new_tokens=6, stop_at_eos=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (2, 3, 40)])
def test_silu_residual_equals_torch(shape, dtype):
    from medusa_llama.decode.kernels import silu_residual

    dev = kernel_device()
    z, s = (torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dev, dtype) for i in (1, 2))
    torch.testing.assert_close(silu_residual(z, s), s + torch.nn.functional.silu(z))  # exp: last-bit differences


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,states,tokens,n,d",
    [(1, 1, 1, 1, 32), (3, 5, 15, 7, 48), (5, 4, 12, 16, 33), (2, 9, 36, 70, 80)],
    ids=["root", "depth", "odd-width", "many-rows"],
)
@pytest.mark.parametrize("block_n", [32, 16])
def test_sequential_mix_equals_the_torch_head(batch, states, tokens, n, d, dtype, block_n, monkeypatch):
    """``SequentialBlock.gathered`` (one kernel) = the PyTorch path's gathers, embedding and head: random parent rows
    and columns, a table in another dtype than the head (cast like ``token_emb.to``), several row and feature
    blocks (70 x 2 rows, 80 or 33 features). bf16 to a few of its steps: Triton's interpreter rounds fp32 to bf16
    toward zero (a GPU to nearest, as PyTorch), so on a CPU each of the kernel's four roundings may differ. Two
    feature tiles."""
    from medusa_llama.decode import kernels
    from medusa_llama.decode.heads import SequentialBlock

    dev = kernel_device()
    monkeypatch.setattr(kernels, "MIX_BLOCK_N", block_n)
    g = torch.Generator().manual_seed(n)
    block = SequentialBlock(d)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=g) * d**-0.5
    block = block.to(dev, dtype)
    table = torch.randn(50, d, generator=g).to(dev, torch.float16)
    x = torch.randn(batch, states, d, generator=g).to(dev, dtype)
    top = torch.randint(0, 50, (batch, tokens), generator=g).to(dev)
    rows = torch.randint(0, states, (n,), generator=g).to(dev)
    columns = torch.randint(0, tokens, (n,), generator=g).to(dev)
    with torch.no_grad():
        emb = torch.nn.functional.embedding(top.index_select(1, columns), table).to(dtype)
        ref = block(x.index_select(1, rows), emb)
        got = block.gathered(x, rows, top, columns, table)
    assert got.shape == (batch, n, d) and got.dtype == dtype
    wide = torch.zeros(batch, tokens + 3, dtype=torch.long, device=dev)  # the columns as a slice of a wider buffer
    wide[:, 2 : 2 + tokens] = top
    with torch.no_grad():
        assert torch.equal(block.gathered(x, rows, wide[:, 2 : 2 + tokens], columns, table), got)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]  # fp16: an ulp or two of the max
    torch.testing.assert_close(got, ref, atol=tol * float(ref.abs().max()), rtol=tol)


@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("batch,t", [(1, 2), (3, 64), (2, 1100)])
def test_tree_tokens_equals_the_gather(batch, t, draft):
    """``kernels.tree_tokens`` writes the root and every node's column (as a draft token id) like the PyTorch path's
    ``index_select``, ``ids[...]`` and ``cat``; only into ``out``'s rows (a wider buffer's leading columns here)."""
    from medusa_llama.decode.kernels import tree_tokens

    dev = kernel_device()
    g = torch.Generator().manual_seed(t)
    top = torch.randint(0, 300, (batch, 40), generator=g).to(dev)
    columns = torch.randint(0, 40, (t - 1,), generator=g).to(dev)
    ids = torch.randperm(300, generator=g).to(dev) if draft else None
    root = torch.randint(0, 300, (batch,), generator=g).to(dev)
    buffer = torch.full((batch, t + 3), -7, device=dev)
    tree_tokens(root, top, columns, ids, buffer[:, :t])
    children = top.index_select(1, columns)
    ref = torch.cat([root[:, None], children if ids is None else ids[children]], dim=1)
    assert torch.equal(buffer[:, :t], ref)
    assert (buffer[:, t:] == -7).all()


def trees():
    """A static tree, a chain, the root's children only, and a dynamic tree's step buffers (retrieve (T, K+1))."""
    star = StepTree.star(DynamicTree(16, 4, 4))
    return [build_tree(builtin_tree("tree64")), build_tree(builtin_tree("chain")), build_tree([[0], [1], [2]]), star]


def planted_rows(shape: tuple, chunk: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with planted maxima, cycling over the rows: in the last column (a partial last chunk), at column 0
    tied with the last column, tied at the last chunk's first and last columns, tied across and within chunks (the
    lowest column must win); bf16 and fp16 add ties of their own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).view(-1, shape[-1])
    n = shape[-1]
    last = (n - 1) // chunk * chunk  # the last chunk's first column
    for r, row in enumerate(x):
        plant = {0: [n - 1], 1: [0, n - 1], 2: [last, n - 1], 3: [chunk + 3, 2, chunk + 5, 3]}.get(r % 5, [])
        row[[c for c in plant if c < n]] = 9.0
    return x.view(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,chunk", [((1, 5000), 1024), ((6, 2049), 0), ((2, 3, 700), 128), ((5, 96), 0), ((7, 40), 16)]
)
def test_argmax_kernels_equal_torch_argmax(shape, chunk, dtype):
    """``argmax_keys`` (logits read in their own dtype) and ``greedy_token`` give ``torch.argmax``: column counts that
    are not multiples of the chunk, the maximum in the last chunk and at column 0, ties lowest column first."""
    from medusa_llama.decode.kernels import _argmax_chunk, argmax_keys, argmax_of, greedy_token

    dev = kernel_device()
    size = chunk or _argmax_chunk(math.prod(shape[:-1]), shape[-1])
    x = planted_rows(shape, size, dtype, seed=shape[-1]).to(dev)
    keys = argmax_keys(x, chunk)
    assert keys.shape == (*shape[:-1], -(-shape[-1] // size)) and keys.dtype == torch.long
    ref = x.argmax(-1)
    assert torch.equal(argmax_of(keys), ref)
    token = torch.full(shape[:-1], -7, device=dev)
    out = torch.full((*shape[:-1], 3), -7, device=dev)
    greedy_token(keys, token, out)
    assert torch.equal(token, ref) and torch.equal(out[..., 1], ref)
    assert (out[..., 0] == -7).all() and (out[..., 2] == -7).all()  # only out[..., 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_kernel_takes_the_first_nan_as_torch_does(dtype):
    """``torch.argmax``'s rule for NaN (either sign, any payload: the maximum, the first one wins), -0.0 = +0.0 (the
    first wins) and a row of -inf (column 0), over chunks of 4 columns."""
    from medusa_llama.decode.kernels import argmax_keys, argmax_of

    nan, inf = float("nan"), float("inf")
    rows = [
        [1.0, 2.0, 3.0, inf, 1.0, -nan, 2.0, nan, nan, 0.0],  # a negative NaN first, in the second chunk
        [inf, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, nan],  # a NaN in the last column beats +inf
        [nan, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, nan],
        [1.0, 2.0, nan, 3.0, 4.0, 5.0, 0.0, 7.0, 8.0, 9.0],  # a NaN of a larger payload (below) after this one
        [-1.0, -0.0, 0.0, -2.0, 0.0, -0.0, -3.0, -1.0, -0.0, -0.0],
        [-inf] * 10,
        [1.0] * 10,
    ]
    x = torch.tensor(rows)
    x[[0, 3], [8, 6]] = torch.tensor(0x7FC12345, dtype=torch.int32).view(torch.float32)  # NaNs of another payload
    x = x.to(kernel_device(), dtype)
    assert torch.equal(argmax_of(argmax_keys(x, 4)), x.argmax(-1))
    assert x.argmax(-1).tolist() == [5, 9, 0, 2, 1, 0, 0]


@pytest.mark.parametrize("tree", trees(), ids=["tree64", "chain", "flat", "dynamic"])
@pytest.mark.parametrize("vocab,dtype", [(8, torch.float32), (300, torch.bfloat16)], ids=["one-chunk", "chunks"])
def test_greedy_accept_kernel_equals_the_torch_rule(tree, vocab, dtype, monkeypatch):
    """Random tokens and logits rigged so paths of every length are accepted: same path, n, out and root as the
    argmax and the PyTorch rule. Over 300 columns the kernel reads 3 chunks' keys per prediction (chunks of 128),
    each node's prediction tied with a decoy at a later column (the prediction, the lower column, must win)."""
    from medusa_llama.decode import kernels

    monkeypatch.setattr(kernels, "ARGMAX_CHUNK_MIN", 128)
    monkeypatch.setattr(kernels, "ARGMAX_CHUNK_MAX", 128)
    dev = kernel_device()
    tree = tree.to(dev)
    g = torch.Generator().manual_seed(vocab)
    for trial in range(0, 6, 1 if vocab == 8 else 2):  # (fewer over 300 columns: the interpreter's time)
        rows, t = 3, tree.size
        tokens = torch.randint(0, vocab, (rows, t), generator=g)
        pred = torch.randint(0, vocab, (rows, t), generator=g)
        parent = tree.parent.cpu().clamp(min=0)
        for b in range(rows):  # accept about half the nodes: the parent's prediction is the node's token
            hit = torch.rand(t, generator=g) < 0.5 + 0.1 * trial
            pred[b, parent[hit]] = tokens[b, hit]
        logits = torch.randn(rows, t, vocab, generator=g).scatter(-1, pred[..., None], 9.0)
        decoy = pred + 1 + (torch.rand(rows, t, generator=g) * (vocab - 1 - pred)).long()  # in pred + 1 .. vocab - 1
        logits.scatter_(-1, decoy.clamp(max=vocab - 1)[..., None], 9.0)  # (the decoy is pred itself at the end)
        logits = logits.to(dev, dtype)
        assert torch.equal(logits.argmax(-1), pred.to(dev))
        tokens = tokens.to(dev)
        outs = []
        for kernel in (False, True):
            for lead in (slice(None), 0):  # a batch of rows, and one sequence
                out = torch.full(tokens[lead].shape[:-1] + (tree.max_depth + 2,), -7, device=dev)
                root = torch.full(tokens[lead].shape[:-1], -7, device=dev)
                path = accept_into(logits[lead], tokens[lead], tree, AcceptanceConfig(), out, root, kernel)
                outs.append((path, out, root))
        for ref, got in zip(outs[:2], outs[2:], strict=True):
            for a, b in zip(ref, got, strict=True):
                assert torch.equal(a, b)


def test_batched_decoder_on_the_kernel_path_equals_vanilla(one_thread, monkeypatch):
    """The batched steps on the GPU path (fused heads, greedy kernels, fused prefix extend; interpreted here), the
    argmax over 3 chunks of 32 columns: Medusa's and the batched vanilla step's."""
    from medusa_llama.decode import kernels

    monkeypatch.setattr(prefix, "FUSED_EXTEND", True)
    monkeypatch.setattr(kernels, "ARGMAX_CHUNK_MIN", 32)
    monkeypatch.setattr(kernels, "ARGMAX_CHUNK_MAX", 32)
    dev = kernel_device()
    bb = make_backbone(tiny_llama().to(dev), FakeTokenizer(), "tiny", 64, "fast")
    prompts = [list(range(3, 14)), list(range(20, 27))]
    refs = [VanillaDecoder(bb).generate(p, GREEDY).tokens for p in prompts]
    bb.tree_kernel = bb.model.use_fused_kernels = True
    heads = random_heads(std=0.05, prefix_attention=True, prefix_num_heads=4, prefix_token_input=True)
    dec = BatchedDecoder(bb, 2, heads, builtin_tree("tree16"))
    assert [r.tokens for r in dec.generate_many(prompts, GREEDY)] == refs
    assert [r.tokens for r in BatchedDecoder(bb, 2).generate_many(prompts, GREEDY)] == refs


@pytest.mark.parametrize("fused_argmax", [False, True])
def test_kernel_path_launches_fewer_kernels(one_thread, fused_argmax, monkeypatch):
    """Outside the verify forward the GPU path launches far fewer kernels than the PyTorch path, none syncs."""
    pytest.importorskip("triton")
    from medusa_llama.decode import lm_head

    monkeypatch.setattr(lm_head, "FUSED_ARGMAX", fused_argmax)
    kernel_device()
    counts = {}
    for path in (False, True):
        bb = make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 64, "fast")
        bb.tree_kernel = bb.model.use_fused_kernels = path
        heads = random_heads(prefix_attention=True, prefix_num_heads=4, prefix_token_input=True)
        counter = count_step(MedusaDecoder(bb, heads, builtin_tree("tree16")), list(range(3, 14)))
        counts[path] = {phase: sum(ops.values()) for phase, ops in counter.phases.items()}
        assert counter.syncs == 0 or not path
    # the argmax's chunks (argmax_keys) and the acceptance that reduces them; with the fused LM head the keys come from
    # the LM head's launch (its fill and GEMM) and the acceptance is the one launch
    assert counts[True]["acceptance"] == (1 if fused_argmax else 2)
    assert counts[True]["lm_head"] == (2 if fused_argmax else 1)
    assert counts[True]["proposal"] < counts[False]["proposal"]


def test_fused_accept_launches_one_kernel_for_three(one_thread, monkeypatch):
    """The prefix heads' step on the kernel path: with ``acceptance.FUSED_ACCEPT`` the acceptance, the backbone's K/V
    move and the prefix layer's inputs are one launch (``accept_move``) where they were three (``greedy_accept``,
    ``move_path``, ``path_inputs``), and the commit only advances; the rest of the step is the same."""
    from medusa_llama.decode import acceptance

    monkeypatch.setattr(prefix, "FUSED_EXTEND", True)
    kernel_device()
    bb = make_backbone(tiny_llama().to(torch.bfloat16), FakeTokenizer(), "tiny", 64, "fast")
    bb.tree_kernel = bb.model.use_fused_kernels = True
    heads = random_heads(prefix_attention=True, prefix_num_heads=4, prefix_token_input=True)
    launched = {}
    for fused in (False, True):
        monkeypatch.setattr(acceptance, "FUSED_ACCEPT", fused)
        phases = count_step(MedusaDecoder(bb, heads, builtin_tree("tree16")), list(range(3, 14))).phases
        launched[fused] = sum(phases.values(), Counter())
    assert launched[False] - launched[True] == Counter(greedy_accept=1, move_path=1, path_inputs=1)
    assert launched[True] - launched[False] == Counter(accept_move=1)
    assert phases["acceptance"]["accept_move"] == 1 and phases["commit"] == {"advance": 1}


def test_greedy_kernel_path_reads_the_logits_uncast(one_thread):
    """On the kernel path the greedy rule takes the LM head's bf16 logits as they are (no cast in the LM head phase)
    and its choice costs two launches: the argmax's chunks, then the acceptance (Medusa) or the token written into
    the root and ``out[1]`` (vanilla: no argmax, no copies). With the fused LM head (``lm_head.FUSED_ARGMAX``, a
    tree's rows) the argmax is in the LM head's launch and the acceptance reads its keys."""
    pytest.importorskip("triton")
    from medusa_llama.decode import lm_head

    kernel_device()
    bb = make_backbone(tiny_llama().to(torch.bfloat16), FakeTokenizer(), "tiny", 64, "fast")
    bb.tree_kernel = bb.model.use_fused_kernels = True
    with pytest.MonkeyPatch.context() as mp:  # the tree's argmax by its own launch, not in the LM head's
        mp.setattr(lm_head, "FUSED_ARGMAX", False)
        unfused = count_step(MedusaDecoder(bb, random_heads(), builtin_tree("tree16")), list(range(3, 14))).phases
    fused = count_step(MedusaDecoder(bb, random_heads(), builtin_tree("tree16")), list(range(3, 14))).phases
    assert fused["lm_head"] == {"argmax_linear": 2} and fused["acceptance"] == {"greedy_accept": 1}  # fill + GEMM
    vanilla = count_step(VanillaDecoder(bb), list(range(3, 14))).phases
    medusa = unfused
    assert vanilla["acceptance"] == {"argmax_keys": 1, "greedy_token": 1}
    assert medusa["acceptance"] == {"argmax_keys": 1, "greedy_accept": 1}
    for phases in (vanilla, medusa):
        assert phases["lm_head"]["mm"] == 1 and "_to_copy" not in phases["lm_head"]
        assert "copy_" not in phases["commit"]
