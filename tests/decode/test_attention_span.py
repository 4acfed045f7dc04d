"""The two attention spans of the PyTorch path give the same results (fp32, CPU).

On a GPU the fast backbone attends over the whole static cache (fixed shapes for CUDA graphs and torch.compile),
masking every slot that is not live; on the CPU it slices the cache to the filled length. The unfilled slots are
filled with large stale values here, so any slot the whole-cache mask fails to block changes the output.
"""

import copy

import torch
from conftest import tiny_llama

from medusa_llama.decode.model import FastLlama, commit_cache, tree_attention_mask
from medusa_llama.decode.tree import build_tree, builtin_tree

MAX_SEQ_LEN = 96


def _model() -> FastLlama:
    model = FastLlama.from_hf(tiny_llama(seed=2))
    model.setup_cache(MAX_SEQ_LEN)
    g = torch.Generator().manual_seed(0)
    model.k_cache.copy_(torch.randn(model.k_cache.shape, generator=g) * 50)  # stale entries everywhere
    model.v_cache.copy_(torch.randn(model.v_cache.shape, generator=g) * 50)
    return model


@torch.no_grad()
def _step(model: FastLlama, tokens, depth, tree_mask, cache_len: int, whole_cache: bool) -> torch.Tensor:
    """One pass of T tokens at slots cache_len.. (positions cache_len + depth): (T, D) hidden states."""
    t = tokens.shape[0]
    span = MAX_SEQ_LEN if whole_cache else cache_len + t
    mask = tree_attention_mask(torch.tensor(cache_len), tree_mask, span, torch.float32)  # (1, 1, T, span)
    slots = cache_len + torch.arange(t)
    return model(tokens[None], (cache_len + depth)[None], slots, mask)[0]


def test_whole_cache_span_equals_filled_span():
    filled, whole = _model(), _model()
    assert torch.equal(filled.k_cache, whole.k_cache)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 96, (11,), generator=g)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    outs = [_step(m, prompt, torch.arange(11), causal, 0, w) for m, w in ((filled, False), (whole, True))]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    cache_len = 11
    tree = build_tree(builtin_tree("tree16"))
    for _ in range(3):  # tree steps, each followed by the KV compaction of one accepted path
        tokens = torch.randint(0, 96, (tree.size,), generator=g)
        outs = [_step(m, tokens, tree.depth, tree.mask, cache_len, w) for m, w in ((filled, False), (whole, True))]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        logits = [m.output(o) for m, o in zip((filled, whole), outs, strict=True)]
        assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
        path = tree.retrieve[int(torch.randint(0, tree.retrieve.shape[0], (1,), generator=g))]
        path = path[path >= 0]  # (n + 1,) root first
        for m in (filled, whole):
            commit_cache(m.k_cache, m.v_cache, torch.tensor(cache_len), path, torch.tensor(path.numel() - 1))
        cache_len += path.numel()
    live = slice(0, cache_len)
    torch.testing.assert_close(filled.k_cache[:, :, live], whole.k_cache[:, :, live], rtol=1e-5, atol=1e-5)


def test_stale_slots_would_change_the_output():
    """The check above can fail: attending to one stale slot past the tree changes the hidden states."""
    model = _model()
    reference = copy.deepcopy(model)
    tree = build_tree(builtin_tree("chain"))
    tokens = torch.randint(0, 96, (tree.size,), generator=torch.Generator().manual_seed(2))
    mask = tree_attention_mask(torch.tensor(20), tree.mask, MAX_SEQ_LEN, torch.float32)  # (1, 1, T, S)
    leaky = mask.clone()
    leaky[..., 20 + tree.size] = 0.0  # one stale slot let through
    slots = 20 + torch.arange(tree.size)
    with torch.no_grad():
        ok = reference(tokens[None], (20 + tree.depth)[None], slots, mask)[0]
        bad = model(tokens[None], (20 + tree.depth)[None], slots, leaky)[0]
    assert not torch.allclose(ok, bad, rtol=1e-3, atol=1e-3)
