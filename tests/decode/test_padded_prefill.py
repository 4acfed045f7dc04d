"""The CUDA-graph prefill's padded form (prompts padded to a bucket, the length on the device) decodes exactly as the
plain prefill. On a GPU it runs as a graph replay; here the same function runs eagerly (``padded_prefill``)."""

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder, prefill_bucket
from medusa_llama.decode.dynamic_tree import DynamicTree
from medusa_llama.decode.tree import builtin_tree

GREEDY = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
CONTEXT = 400  # not a power of two: the largest bucket is capped at the context
HEADS = {
    "vanilla": None,
    "medusa": lambda: random_heads("medusa"),
    "prefix": lambda: random_heads("sequential", prefix_attention=True, prefix_num_heads=4),
}


def test_buckets_double_from_64_and_stop_at_the_context():
    assert [prefill_bucket(n, 2048) for n in (1, 64, 65, 128, 129, 1000, 2048)] == [64, 64, 128, 128, 256, 1024, 2048]
    assert prefill_bucket(260, CONTEXT) == CONTEXT


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", CONTEXT, "fast")


def decoder(backbone, heads: str, tree: str, padded: bool):
    if HEADS[heads] is None:
        dec = VanillaDecoder(backbone)
    else:
        shape = DynamicTree(16, 4, 4) if tree == "dynamic16" else builtin_tree(tree)
        dec = MedusaDecoder(backbone, HEADS[heads](), shape)
    dec.padded_prefill = padded
    return dec


@pytest.mark.parametrize("tree", ["tree64", "dynamic16"])
@pytest.mark.parametrize("heads", list(HEADS))
def test_padded_prefill_decodes_as_the_plain_one(backbone, heads, tree):
    if heads == "vanilla" and tree != "tree64":
        pytest.skip("vanilla decoding has no tree")
    g = torch.Generator().manual_seed(5)
    plain, padded = decoder(backbone, heads, tree, False), decoder(backbone, heads, tree, True)
    for n in (5, 64, 70, 260):  # buckets 64, 64, 128 and the capped 400
        prompt = torch.randint(0, 96, (n,), generator=g).tolist()
        ref = plain.generate(prompt, GREEDY)
        # Prefill only (one new token), then compare what the first step starts from.
        padded.generate(prompt, GenerationConfig(max_new_tokens=1, stop_at_eos=False))
        plain.generate(prompt, GenerationConfig(max_new_tokens=1, stop_at_eos=False))
        assert int(padded.backbone.cache_len) == n and int(padded.root) == int(plain.root)
        torch.testing.assert_close(padded.hidden, plain.hidden, rtol=1e-5, atol=1e-5)
        if heads != "vanilla":
            assert torch.equal(padded.tokens, plain.tokens)  # the same first proposal
            if heads == "prefix":
                assert int(padded.prefix_cache.length) == n
        out = padded.generate(prompt, GREEDY)
        assert out.tokens == ref.tokens, n
