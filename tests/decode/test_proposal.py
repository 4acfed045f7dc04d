"""Head proposal: every tree node holds the rank-th top token of its head, given the path above it.

The reference is brute force: node by node, the head states are recomputed along the node's own path (one head
call per ancestor, no batching, no reuse between nodes) and the node's rank is read from a full descending sort
of its head's logits. The decoder's proposal must agree token for token.
"""

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama
from test_prefix import kernel_device

from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import MedusaDecoder
from medusa_llama.decode.op_count import OpCounter
from medusa_llama.decode.proposal import propose
from medusa_llama.decode.tree import build_tree, builtin_tree

# Deep and wide: ranks up to 3 below depth 1, every depth of four heads, several expanders per depth.
WIDE = [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]]
WIDE += [[1, 0, 0], [1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 1]]


@torch.no_grad()
def brute_force_tokens(heads, hidden, root: int, tree, embed, lm_head) -> list[int]:
    """(T,) tokens: node i = the ``rank``-th entry of a full sort of its head's logits along its own path."""
    index = {(): 0} | {p: i + 1 for i, p in enumerate(tree.paths)}
    tokens = {(): root}
    for path in tree.paths:  # sorted by depth: a node's ancestors are filled before it
        state = hidden  # (D,) s_0 = h_t
        for k in range(len(path)):
            if heads.config.kind == "sequential":
                prev_token = torch.tensor(tokens[path[:k]])  # x_{t+k}: the path's token at depth k
                state = heads.head_state(k, state, embed(prev_token))
            else:
                state = heads.head_state(k, hidden)  # medusa heads all read h_t
        logits = heads.project(len(path) - 1, state, lm_head)  # (V,)
        tokens[path] = int(logits.argsort(descending=True)[path[-1]])
    return [tokens[p] for p in sorted(index, key=index.get)]


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 128, "fast")


@pytest.mark.parametrize(
    "kind,lm_head", [("sequential", "shared"), ("sequential", "own"), ("medusa", "shared"), ("medusa", "own")]
)
@pytest.mark.parametrize("choices", [WIDE, builtin_tree("tree32")], ids=["wide", "tree32"])
def test_proposal_is_the_brute_force_top_k(backbone, kind, lm_head, choices):
    heads = path_heads(kind, lm_head)
    tree = build_tree(choices, heads.num_heads)
    dec = MedusaDecoder(backbone, heads, tree)
    hidden = backbone.prefill(torch.tensor([3, 14, 15, 92, 65, 35]))[-1]  # (D,) a real backbone state
    for root in (7, 42):
        dec.hidden.copy_(hidden)
        dec.root.fill_(root)
        dec.propose()
        ref = brute_force_tokens(dec.heads, hidden, root, tree, backbone.embed, backbone.lm_head)
        assert dec.tokens.tolist() == ref
        if kind == "sequential":  # siblings' subtrees differ: the path really conditions deeper heads
            assert any(ref[i] != ref[j] for i, j in _cousin_pairs(tree))


def path_heads(kind: str, lm_head: str):
    heads = random_heads(kind, lm_head=lm_head, num_layers=2, std=0.1)
    if kind == "sequential":
        for mix in heads.mix:  # the tiny model's embeddings are small (std 0.02): make the path token matter
            torch.nn.init.normal_(mix.token.weight, std=30.0)
    return heads


@pytest.mark.parametrize("kind,lm_head", [("sequential", "shared"), ("sequential", "own"), ("medusa", "own")])
@pytest.mark.parametrize("draft_size", [None, 40], ids=["full-vocab", "draft-vocab"])
def test_fused_proposal_equals_the_torch_path(backbone, kind, lm_head, draft_size):
    """The GPU path's kernels (``fused``: ``kernels.sequential_mix`` per depth, ``kernels.tree_tokens``; Triton's
    interpreter here) propose the same trees as the PyTorch path, for a batch of three rows (two of one root), into
    ``out`` and not, with and without a draft vocabulary; the sequential heads' depths are one mix kernel each."""
    kernel_device()
    heads = path_heads(kind, lm_head)
    heads.draft_vocab = torch.randperm(96, generator=torch.Generator().manual_seed(1))[:48]
    draft = heads.draft(backbone.lm_head, draft_size, backbone.embed) if draft_size else None
    tree = build_tree(WIDE, heads.num_heads)
    hidden = backbone.prefill(torch.tensor([3, 14, 15, 92, 65, 35]))[-3:]  # (3, D) real backbone states
    root = torch.tensor([7, 42, 7])
    args = (heads, hidden, root, tree, backbone.embed, backbone.lm_head, draft)
    ref = propose(*args, fused=False)
    counter = OpCounter()
    with counter:
        got = propose(*args, fused=True)
    assert torch.equal(got, ref)
    out = torch.full_like(ref, -1)
    assert propose(*args, fused=True, out=out) is out and torch.equal(out, ref)
    assert counter.pending["tree_tokens"] == 1 and counter.pending["cat"] <= 1
    if kind == "sequential":
        assert counter.pending["sequential_mix"] == tree.max_depth
        assert not {"index_select", "embedding", "index"} & set(counter.pending)


def _cousin_pairs(tree) -> list[tuple[int, int]]:
    """Nodes with the same ranks below different depth-1 ancestors, e.g. [0, 0] and [1, 0]."""
    index = {p: i + 1 for i, p in enumerate(tree.paths)}
    return [(index[p], index[(p[0] + 1, *p[1:])]) for p in tree.paths if len(p) > 1 and (p[0] + 1, *p[1:]) in index]
