"""Dynamic trees: the selection is the best paths and always a tree, its tensors say so, decoding stays lossless and
the step makes no host sync."""

import itertools

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode.acceptance import AcceptanceConfig, accept
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.dynamic_tree import DynamicTree, StepTree, expand, parse_dynamic, propose, select
from medusa_llama.pipeline import load_tree

GREEDY = GenerationConfig(max_new_tokens=40, stop_at_eos=False)


def table_logp(tables: list[torch.Tensor]):
    """``next_logp`` from hand-made tables: tables[d] is (V, V), row x = head d+1's probabilities after token x."""

    def next_logp(d, rows, tokens):
        return tables[d][tokens].log()  # (n, V)

    return next_logp


def node_paths(tokens: torch.Tensor, tree: StepTree) -> list[tuple[int, ...]]:
    """Each node's token path from the root (root excluded)."""
    paths = []
    for i in range(tree.size):
        path, j = [], i
        while j > 0:
            path.append(int(tokens[j]))
            j = int(tree.parent[j])
        paths.append(tuple(reversed(path)))
    return paths


def check_is_tree(tokens: torch.Tensor, tree: StepTree) -> None:
    """Parents come first, depths add up, the mask is the ancestor relation, retrieve rows are the paths."""
    t = tree.size
    assert tree.parent[0] == -1 and tree.depth[0] == 0
    for i in range(1, t):
        p = int(tree.parent[i])
        assert 0 <= p < i  # the parent is selected, and earlier
        assert tree.depth[i] == tree.depth[p] + 1  # position = prefix + depth
    for i in range(t):
        ancestors, j = [], i
        while j >= 0:
            ancestors.append(j)
            j = int(tree.parent[j])
        assert set(torch.nonzero(tree.mask[i]).flatten().tolist()) == set(ancestors)
        row = tree.retrieve[i].tolist()
        assert row[: len(ancestors)] == ancestors[::-1] and all(r == -1 for r in row[len(ancestors) :])
    for p in range(t):  # siblings hold distinct tokens (sampling acceptance relies on it)
        sibling_tokens = tokens[tree.parent == p].tolist()
        assert len(sibling_tokens) == len(set(sibling_tokens))


def test_spec_parsing_and_sizes():
    assert parse_dynamic("dynamic64", 4) == DynamicTree(64, 8, 4)
    assert parse_dynamic("dynamic32k4", 3) == DynamicTree(32, 4, 3)
    assert parse_dynamic("tree64", 4) is None and parse_dynamic("dynamic", 4) is None
    assert load_tree("dynamic64", 4) == DynamicTree(64, 8, 4)
    assert DynamicTree(64, 4, 4).candidates == 4 + 3 * 16 and DynamicTree(64, 4, 4).size == 53  # budget capped
    with pytest.raises(ValueError, match="dynamic1"):
        parse_dynamic("dynamic1", 4)


def test_selection_is_the_best_paths_on_hand_made_probabilities():
    # k = V and two heads: the candidates are every path of depth <= 2, so the tree is the N-1 most likely paths.
    g = torch.Generator().manual_seed(0)
    v = 5
    p1 = torch.softmax(torch.randn(v, generator=g) * 2, -1)
    p2 = torch.softmax(torch.randn(v, v, generator=g) * 2, -1)
    tables = [p1.expand(v, v), p2]
    root = torch.tensor(0)
    every = {(a,): float(p1[a]) for a in range(v)} | {
        (a, b): float(p1[a] * p2[a, b]) for a in range(v) for b in range(v)
    }
    for budget in (2, 4, 9, 17, 26):
        spec = DynamicTree(budget, topk=v, depth=2)
        tokens, tree = select(expand(table_logp(tables), root, spec), spec)
        best = sorted(every, key=every.get, reverse=True)[: budget - 1]
        assert set(node_paths(tokens, tree)[1:]) == set(best)
        assert tokens[0] == root
        check_is_tree(tokens, tree)


def reference_tree(tables, spec: DynamicTree) -> set[tuple[int, ...]]:
    """EAGLE-2's expand-then-rerank in plain Python: the token paths a dynamic tree should select."""

    def children(d, path, value):
        probs = tables[d][path[-1] if path else 0]
        top = sorted(range(len(probs)), key=lambda x: -float(probs[x]))[: spec.topk]
        return [(path + (x,), value * float(probs[x])) for x in top]

    level = children(0, (), 1.0)
    every = list(level)
    for d in range(1, spec.depth):
        frontier = sorted(level, key=lambda pv: -pv[1])[: spec.topk]
        level = [c for path, value in frontier for c in children(d, path, value)]
        every += level
    return {path for path, _ in sorted(every, key=lambda pv: -pv[1])[: spec.size - 1]}


@pytest.mark.parametrize("seed", range(6))
def test_selection_matches_the_reference_and_is_a_tree(seed):
    g = torch.Generator().manual_seed(seed)
    v, k, depth = 12, 3 + seed % 3, 4
    tables = [torch.softmax(torch.randn(v, v, generator=g) * 3, -1) for _ in range(depth)]
    for budget in (2, 7, 20, 200):
        spec = DynamicTree(budget, k, depth)
        tokens, tree = select(expand(table_logp(tables), torch.tensor(0), spec), spec)
        check_is_tree(tokens, tree)
        assert set(node_paths(tokens, tree)[1:]) == reference_tree(tables, spec)


@pytest.mark.parametrize("probs", ["uniform", "certain", "coarse"])
def test_ties_still_select_every_parent(probs):
    """Equal values (uniform heads, probability 1, or rounded probabilities) must not drop a selected node's parent."""
    g = torch.Generator().manual_seed(1)
    v, depth = 6, 4
    if probs == "uniform":
        tables = [torch.full((v, v), 1 / v)] * depth
    elif probs == "certain":
        tables = [torch.eye(v)[torch.randperm(v, generator=g)]] * depth  # one token has probability 1, others 0
    else:
        tables = [(torch.rand(v, v, generator=g) * 4).round() / 4 for _ in range(depth)]  # many equal entries
    for budget, k in itertools.product((3, 10, 40), (2, 4)):
        spec = DynamicTree(budget, k, depth)
        cands = expand(table_logp(tables), torch.tensor(2), spec)
        assert torch.isfinite(cands.value).all()
        child = torch.arange(1, cands.value.numel())
        assert (cands.value[child] < cands.value[cands.parent[child]]).all()  # strictly below the parent
        tokens, tree = select(cands, spec)
        check_is_tree(tokens, tree)


@pytest.fixture(scope="module", params=["fast", "hf"])
def backbone(request):
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, request.param)


@pytest.mark.parametrize("spec", [DynamicTree(16), DynamicTree(64), DynamicTree(64, topk=4), DynamicTree(5, topk=2)])
@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_greedy_dynamic_tree_equals_vanilla(backbone, kind, spec):
    vanilla = VanillaDecoder(backbone)
    medusa = MedusaDecoder(backbone, random_heads(kind), spec)
    assert medusa.tree.size == spec.size
    for prompt in ([4, 8, 15, 16, 23, 42], list(range(3, 30))):
        ref = vanilla.generate(prompt, GREEDY)
        out = medusa.generate(prompt, GREEDY)
        assert out.tokens == ref.tokens
        assert out.mean_accepted == pytest.approx((len(out.tokens) - 1) / out.steps)


def test_a_tree_shallower_than_the_heads_and_sampling_run(backbone):
    heads = random_heads("sequential")
    out = MedusaDecoder(backbone, heads, DynamicTree(12, 3, depth=2)).generate([5, 6, 7], GREEDY)
    assert out.tokens == VanillaDecoder(backbone).generate([5, 6, 7], GREEDY).tokens
    sampled = GenerationConfig(max_new_tokens=30, temperature=0.8, seed=0, stop_at_eos=False)
    assert len(MedusaDecoder(backbone, heads, DynamicTree(24)).generate([5, 6, 7], sampled).tokens) == 30


def test_proposal_and_acceptance_make_no_host_sync(monkeypatch):
    """A CUDA graph cannot capture a host read: proposal, tree building and acceptance must not make one."""
    bb = make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, "fast")
    decoders = [MedusaDecoder(bb, random_heads(kind), DynamicTree(32)) for kind in ("medusa", "sequential")]
    logits = torch.randn(32, 96)
    for dec in decoders:
        dec.generate([1, 2, 3], GenerationConfig(max_new_tokens=4, stop_at_eos=False))  # state to propose from

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync inside the step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    proposed = []
    for dec in decoders:
        dec.propose()
        tokens, tree = propose(dec.heads, dec.hidden, dec.root, dec.dynamic, bb.embed, bb.lm_head)
        for rule, temperature in (("greedy", 0.0), ("sampling", 0.7), ("typical", 0.7)):
            accept(logits, tokens, tree, AcceptanceConfig(rule, temperature))
        proposed += [(tokens, tree), (dec.tokens, dec.tree)]
    monkeypatch.undo()
    for tokens, tree in proposed:
        check_is_tree(tokens, tree)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_dynamic_tree_step_is_one_cuda_graph_on_gpu(kind):
    """The capture fails on any host sync; the replayed steps must still decode exactly as vanilla (fp32)."""
    bb = make_backbone(tiny_llama().cuda(), FakeTokenizer(), "tiny", 256, "fast")
    assert bb.supports_cuda_graphs
    vanilla = VanillaDecoder(bb)
    medusa = MedusaDecoder(bb, random_heads(kind), DynamicTree(48))
    for prompt in ([4, 8, 15, 16, 23, 42], list(range(3, 30))):
        assert medusa.generate(prompt, GREEDY).tokens == vanilla.generate(prompt, GREEDY).tokens
    assert all(step.graph is not None for step in medusa._steps.values())
