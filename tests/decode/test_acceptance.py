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


# p(x) > min(epsilon, delta * exp(-H(p))) decides. Root distribution over 8 tokens with entropy H = 1.469 nats,
# so delta * exp(-H) = 0.069 at delta = 0.3 and 0.230 at delta = 1.0.
ROOT_P = torch.tensor([0.5, 0.2, 0.12, 0.08, 0.05, 0.03, 0.015, 0.005])
TYPICAL_TREE = build_tree([[0], [1], [0, 0]])  # nodes: 1 = [0], 2 = [1], 3 = [0, 0] (child of node 1)


def _typical_case():
    logits = torch.zeros(TYPICAL_TREE.size, 8)
    logits[0] = ROOT_P.log()
    logits[1, 6] = 40.0  # under node 1 token 6 is certain: node 3 passes if its parent does
    logits[2, 1] = 40.0  # the bonus after node 2
    logits[3, 2] = 40.0  # the bonus after node 3
    tokens = torch.tensor([0, 4, 3, 6])  # node 1: p = 0.05; node 2: p = 0.08 (both under the root)
    return logits, tokens


def test_typical_entropy_threshold_accepts_below_epsilon_and_rejects_the_unlikely_child():
    entropy = -(ROOT_P * ROOT_P.log()).sum()
    assert 0.05 < 0.3 * torch.exp(-entropy) < 0.08 < 0.09  # the entropy term, not epsilon, is the threshold
    logits, tokens = _typical_case()
    cfg = AcceptanceConfig("typical", temperature=1.0, typical_epsilon=0.09, typical_delta=0.3)
    path, n, bonus = accept_typical(logits, tokens, TYPICAL_TREE, cfg)
    # node 1 (p = 0.05) is rejected, so its certain child node 3 is unreachable; node 2 (p = 0.08 < epsilon) passes
    assert int(n) == 1 and path[:2].tolist() == [0, 2] and int(bonus) == 1


def test_typical_threshold_is_the_smaller_of_epsilon_and_the_entropy_term():
    logits, tokens = _typical_case()
    # delta = 1: delta * exp(-H) = 0.23 > epsilon = 0.09, so epsilon decides and rejects p = 0.08 as well
    strict = AcceptanceConfig("typical", temperature=1.0, typical_epsilon=0.09, typical_delta=1.0)
    _, n, _ = accept_typical(logits, tokens, TYPICAL_TREE, strict)
    assert int(n) == 0
    # epsilon = 0.04 < 0.069: node 1 (p = 0.05) passes, then its child under node 1's own distribution
    loose = AcceptanceConfig("typical", temperature=1.0, typical_epsilon=0.04, typical_delta=0.3)
    path, n, bonus = accept_typical(logits, tokens, TYPICAL_TREE, loose)
    assert int(n) == 2 and path.tolist() == [0, 1, 3] and int(bonus) == 2


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_library_refuses_a_non_finite_or_negative_temperature(temperature):
    from medusa_llama.decode.decoder import GenerationConfig

    with pytest.raises(ValueError, match="--temperature"):
        GenerationConfig(temperature=temperature)
