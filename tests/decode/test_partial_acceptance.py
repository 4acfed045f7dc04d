"""Heads that are right only sometimes, and often not at rank 0: greedy Medusa still equals vanilla greedy exactly.

The stub knows the backbone's greedy continuation and, step by step in a fixed cycle, puts the right tokens on one
chosen path of the tree (rank 0, rank 1 or rank 2 at depth 1, non-zero ranks deeper) or nowhere; every other node
holds a wrong token. So each step must accept exactly the chosen path's length: acceptance lengths vary from 0 to
the full depth, and the output must not change.
"""

import pytest
import torch
from conftest import FakeTokenizer, tiny_llama

from medusa_llama.decode import proposal
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.heads import HeadsConfig, MedusaHeads

V = 96
TREE = [[0], [1], [2], [0, 0], [1, 0], [1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0]]
# The path holding the right tokens, per step in turn (() = none is right); its length is the step's accepted count.
CYCLE = [(1,), (0, 0, 0), (), (1, 1, 0), (2,), (1, 0), (1, 0, 0), (0,), (1, 1)]
NEW_TOKENS = 48


class SometimesRightHeads(MedusaHeads):
    """Right along ``CYCLE[step % len(CYCLE)]``, wrong elsewhere; ``answer`` is the greedy continuation."""

    def __init__(self, backbone, prompt_len: int, answer: list[int]):
        super().__init__(HeadsConfig(num_heads=3, hidden_size=64, vocab_size=V, base_model="tiny"))
        self.backbone, self.prompt_len, self.answer = backbone, prompt_len, answer
        self.chosen: list[tuple[int, ...]] = []  # the right path of each proposal, in order
        self.gen = torch.Generator().manual_seed(0)

    def propose(self, hidden, root, tree, embed, lm_head, draft=None, fused=False, out=None):
        at = int(self.backbone.cache_len) - self.prompt_len + 1  # index in `answer` of the root's successor
        assert int(root) == self.answer[at - 1]  # the decoder's root is the last greedy token
        right = CYCLE[len(self.chosen) % len(CYCLE)]
        self.chosen.append(right)
        tokens = torch.randint(0, V, (tree.size,), generator=self.gen)
        tokens[0] = root
        for i, path in enumerate(tree.paths, start=1):
            truth = self.answer[at + len(path) - 1]
            if path == right[: len(path)]:
                tokens[i] = truth
            elif tokens[i] == truth:
                tokens[i] = (truth + 1) % V  # wrong, whatever its parent
        return out.copy_(tokens)  # the decoder passes its tokens buffer


@pytest.fixture(scope="module", params=["fast", "hf"])
def backbone(request):
    return make_backbone(tiny_llama(seed=1), FakeTokenizer(), "tiny", 256, request.param)


@pytest.mark.parametrize("prompt", [[5, 9, 2, 77, 31], list(range(40, 63))])
def test_sometimes_right_heads_keep_greedy_output(backbone, prompt, monkeypatch):
    monkeypatch.setattr(proposal, "propose", lambda heads, *args: heads.propose(*args))  # the stub proposes
    depth = max(len(p) for p in TREE)
    ref = VanillaDecoder(backbone).generate(prompt, GenerationConfig(NEW_TOKENS + depth + 1, stop_at_eos=False))
    heads = SometimesRightHeads(backbone, len(prompt), ref.tokens)
    steps: list[list[int]] = []
    out = MedusaDecoder(backbone, heads, TREE).generate(
        prompt, GenerationConfig(NEW_TOKENS, stop_at_eos=False), on_tokens=steps.append
    )
    assert out.tokens == ref.tokens[:NEW_TOKENS]
    lengths = [len(s) for s in steps[1:]]  # steps[0] is the prefill's token
    expected = [len(heads.chosen[i]) + 1 for i in range(len(lengths))]  # step i verifies proposal i
    assert lengths[:-1] == expected[:-1]  # the last step may be cut by the token budget
    assert 1 <= lengths[-1] <= expected[-1]
    assert {len(heads.chosen[i]) for i in range(len(lengths) - 1)} == {0, 1, 2, 3}  # lengths really varied
