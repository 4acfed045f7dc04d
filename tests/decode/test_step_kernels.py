"""The decode step's small Triton kernels equal their PyTorch references (on a CPU through Triton's interpreter):
the sequential heads' ``s + silu(z)`` and their whole mix with its gathers, the tree's tokens, greedy acceptance
with the step's emitted tokens, and the whole batched decoder on the kernel path; and the kernel path cuts the
step's launches (``op_count``)."""

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
@pytest.mark.parametrize("variant", [(True, 32), (False, 32), (False, 16)], ids=["dot", "reduce", "reduce-n16"])
def test_sequential_mix_equals_the_torch_head(batch, states, tokens, n, d, dtype, variant, monkeypatch):
    """``SequentialBlock.gathered`` (one kernel) = the PyTorch path's gathers, embedding and head: random parent rows
    and columns, a table in another dtype than the head (cast like ``token_emb.to``), several row and feature
    blocks (70 x 2 rows, 80 or 33 features). bf16 to a few of its steps: Triton's interpreter rounds fp32 to bf16
    toward zero (a GPU to nearest, as PyTorch), so on a CPU each of the kernel's four roundings may differ. Both
    forms of the products (``kernels.MIX_DOT``: tl.dot, or multiply-reduce) and two feature tiles."""
    from medusa_llama.decode import kernels
    from medusa_llama.decode.heads import SequentialBlock

    dev = kernel_device()
    monkeypatch.setattr(kernels, "MIX_DOT", variant[0])
    monkeypatch.setattr(kernels, "MIX_BLOCK_N", variant[1])
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


@pytest.mark.parametrize("tree", trees(), ids=["tree64", "chain", "flat", "dynamic"])
def test_greedy_accept_kernel_equals_the_torch_rule(tree):
    """Random tokens and logits rigged so paths of every length are accepted: same path, n, out and root."""
    dev = kernel_device()
    tree = tree.to(dev)
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        rows, t = 3, tree.size
        tokens = torch.randint(0, 8, (rows, t), generator=g)
        pred = torch.randint(0, 8, (rows, t), generator=g)
        parent = tree.parent.cpu().clamp(min=0)
        for b in range(rows):  # accept about half the nodes: the parent's prediction is the node's token
            hit = torch.rand(t, generator=g) < 0.5 + 0.1 * trial
            pred[b, parent[hit]] = tokens[b, hit]
        logits = torch.nn.functional.one_hot(pred, 8).float().to(dev)  # argmax = pred
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
    """The batched step on the GPU path (fused heads, greedy kernel, fused prefix extend; interpreted here)."""
    monkeypatch.setattr(prefix, "FUSED_EXTEND", True)
    dev = kernel_device()
    bb = make_backbone(tiny_llama().to(dev), FakeTokenizer(), "tiny", 64, "fast")
    prompts = [list(range(3, 14)), list(range(20, 27))]
    refs = [VanillaDecoder(bb).generate(p, GREEDY).tokens for p in prompts]
    bb.tree_kernel = bb.model.use_fused_kernels = True
    heads = random_heads(std=0.05, prefix_attention=True, prefix_num_heads=4, prefix_token_input=True)
    dec = BatchedDecoder(bb, 2, heads, builtin_tree("tree16"))
    assert [r.tokens for r in dec.generate_many(prompts, GREEDY)] == refs


def test_kernel_path_launches_fewer_kernels(one_thread):
    """Outside the verify forward the GPU path launches far fewer kernels than the PyTorch path, none syncs."""
    pytest.importorskip("triton")
    kernel_device()
    counts = {}
    for path in (False, True):
        bb = make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 64, "fast")
        bb.tree_kernel = bb.model.use_fused_kernels = path
        heads = random_heads(prefix_attention=True, prefix_num_heads=4, prefix_token_input=True)
        counter = count_step(MedusaDecoder(bb, heads, builtin_tree("tree16")), list(range(3, 14)))
        counts[path] = {phase: sum(ops.values()) for phase, ops in counter.phases.items()}
        assert counter.syncs == 0 or not path
    assert counts[True]["acceptance"] == 2  # the argmax and one kernel
    assert counts[True]["proposal"] < counts[False]["proposal"]
