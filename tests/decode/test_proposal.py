"""Head proposal: every tree node holds the rank-th top token of its head, given the path above it.

The reference is brute force: node by node, the head states are recomputed along the node's own path (one head
call per ancestor, no batching, no reuse between nodes) and the node's rank is read from a full descending sort
of its head's logits. The decoder's proposal must agree token for token.
"""

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import MedusaDecoder
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
    heads = random_heads(kind, lm_head=lm_head, num_layers=2, std=0.1)
    if kind == "sequential":
        for mix in heads.mix:  # the tiny model's embeddings are small (std 0.02): make the path token matter
            torch.nn.init.normal_(mix.token.weight, std=30.0)
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


def _cousin_pairs(tree) -> list[tuple[int, int]]:
    """Nodes with the same ranks below different depth-1 ancestors, e.g. [0, 0] and [1, 0]."""
    index = {p: i + 1 for i, p in enumerate(tree.paths)}
    return [(index[p], index[(p[0] + 1, *p[1:])]) for p in tree.paths if len(p) > 1 and (p[0] + 1, *p[1:]) in index]
