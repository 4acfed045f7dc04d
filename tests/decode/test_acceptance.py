"""Acceptance rules on synthetic distributions: sampling is lossless, typical follows its threshold."""

import pytest
import torch

from medusa_llama.decode.acceptance import AcceptanceConfig, accept_greedy, accept_sampling, accept_typical
from medusa_llama.decode.tree import build_tree

V = 6
TREE = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0]])  # root; 3 children; grandchildren under [0] and [1]


def _logits_and_tokens(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(TREE.size, V, generator=g) * 1.5
    # children of one parent hold distinct tokens, as top-k drafts do
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    return logits, tokens


def test_greedy_accepts_the_argmax_path():
    logits, tokens = _logits_and_tokens(0)
    logits[0] = torch.tensor([0, 0, 9.0, 0, 0, 0])  # root predicts token 2 = node 2 ([1])
    logits[2] = torch.tensor([9.0, 0, 0, 0, 0, 0])  # node [1] predicts token 0 = node 6 ([1, 0])
    logits[6] = torch.tensor([0, 0, 0, 0, 9.0, 0])
    path, n, bonus = accept_greedy(logits, tokens, TREE)
    assert int(n) == 2 and path[:3].tolist() == [0, 2, 6] and int(bonus) == 4


def test_typical_threshold():
    logits, tokens = _logits_and_tokens(1)
    cfg = AcceptanceConfig("typical", temperature=1.0, typical_epsilon=0.09, typical_delta=0.3)
    logits[0] = torch.tensor([0, 0, 5.0, 0, 0, 0])  # token 2 very likely, others ~0.006 < epsilon
    path, n, _ = accept_typical(logits, tokens, TREE, cfg)
    assert int(n) >= 1 and int(path[1]) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_first_token_is_distributed_as_the_backbone(seed):
    """The first emitted token of a step must be distributed exactly as softmax(root logits)."""
    logits, tokens = _logits_and_tokens(seed)
    cfg = AcceptanceConfig("sampling", temperature=1.0)
    torch.manual_seed(seed)
    draws = 6000
    first = torch.zeros(V)
    second = {}  # for paths through node [0]: the token after it
    for _ in range(draws):
        path, n, bonus = accept_sampling(logits, tokens, TREE, cfg)
        emitted = tokens[path[1 : int(n) + 1]].tolist() + [int(bonus)]
        first[emitted[0]] += 1
        if emitted[0] == int(tokens[1]):
            second.setdefault("after0", torch.zeros(V))[emitted[1]] += 1
    p = torch.softmax(logits[0], -1)
    # within 5 standard errors per token
    se = (p * (1 - p) / draws).sqrt()
    assert ((first / draws - p).abs() <= 5 * se + 1e-3).all(), (first / draws, p)
    # the token after an accepted node [0] is distributed as node [0]'s own distribution (node 1)
    after = second["after0"]
    q = torch.softmax(logits[1], -1)
    se2 = (q * (1 - q) / after.sum()).sqrt()
    assert ((after / after.sum() - q).abs() <= 5 * se2 + 1e-3).all(), (after / after.sum(), q)
