"""The fast backbone equals the HF forward; tree passes equal sequential decoding; compaction is exact."""

import pytest
import torch
from conftest import TINY, FakeTokenizer, tiny_llama
from test_prefix import kernel_device

from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.model import FastLlama, ModelArgs
from medusa_llama.decode.tree import build_tree, builtin_tree


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": True,
        },
    ],
)
def test_fast_forward_equals_hf(overrides):
    hf = tiny_llama(**overrides)
    fast = FastLlama.from_hf(hf)
    fast.setup_cache(64)
    ids = torch.randint(0, 96, (1, 20))
    pos = torch.arange(20)[None]
    causal = torch.full((20, 64), torch.finfo(torch.float32).min).triu(1)[None, None]
    ours = fast.output(fast(ids, pos, torch.arange(20), causal))
    ref = hf(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_rope_table_holds_what_rope_computes():
    """A forward gathers its positions' cos and sin from the table ``setup_cache`` made: the values ``rope`` computes
    for those positions alone, bit for bit (it rounds each element on its own)."""
    m = FastLlama.from_hf(tiny_llama())
    m.setup_cache(300)
    positions = torch.tensor([[0, 5, 17, 299, 128, 3, 3]])
    for got, want in zip(m.rope_table[:, positions], m.rope(positions, torch.float32), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(m.rope_table[0, 5], m.rope_table[0, 6])  # the check above can fail: positions differ


def test_qwen2_biases_are_used():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**TINY)
    hf = Qwen2ForCausalLM(cfg).eval()
    for layer in hf.model.layers:
        torch.nn.init.normal_(layer.self_attn.q_proj.bias)
    fast = FastLlama.from_hf(hf)
    fast.setup_cache(32)
    ids = torch.randint(0, 96, (1, 12))
    causal = torch.full((12, 32), torch.finfo(torch.float32).min).triu(1)[None, None]
    torch.testing.assert_close(
        fast.output(fast(ids, torch.arange(12)[None], torch.arange(12), causal)), hf(ids).logits, rtol=1e-5, atol=1e-5
    )


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config

    with pytest.raises(NotImplementedError):
        ModelArgs.from_hf_config(GPT2Config())


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_each_tree_path_equals_sequential_decoding(backend):
    """One tree pass gives, for every root-to-leaf path, the logits of decoding that path token by token."""
    hf = tiny_llama()
    bb = make_backbone(hf, FakeTokenizer(), "tiny", 128, backend)
    tree = build_tree(builtin_tree("tree32"))
    prompt = torch.randint(0, 96, (9,))
    tokens = torch.randint(0, 96, (tree.size,))
    bb.prefill(prompt)
    tree_logits = bb.logits(bb.forward_tree(tokens, tree.mask, tree.depth))  # (T, V)
    for path in tree.retrieve:
        path = path[path >= 0]
        seq = torch.cat([prompt, tokens[path]])
        ref = hf(seq[None]).logits[0, len(prompt) :]  # (len(path), V)
        torch.testing.assert_close(tree_logits[path], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["fast", "hf", "kernel"])
def test_commit_keeps_later_steps_correct(backend):
    """After compacting an accepted path into place, the next forward matches a fresh forward of the sequence.
    ``kernel``: the fast backbone on the GPU path (Triton kernels; interpreted on a CPU)."""
    dev = kernel_device() if backend == "kernel" else "cpu"
    hf = tiny_llama(seed=1).to(dev)
    bb = make_backbone(hf, FakeTokenizer(), "tiny", 128, "fast" if backend == "kernel" else backend)
    if backend == "kernel":
        bb.tree_kernel = bb.model.use_fused_kernels = True
    tree = build_tree([[0], [1], [0, 0], [1, 0], [1, 1], [1, 1, 0]]).to(dev)
    prompt = torch.randint(0, 96, (7,), device=dev)
    tokens = torch.randint(0, 96, (tree.size,), device=dev)
    bb.prefill(prompt)
    bb.forward_tree(tokens, tree.mask, tree.depth)
    path = torch.tensor([0, 2, 5, 6], device=dev)  # root -> [1] -> [1, 1] -> [1, 1, 0]
    bb.commit(path, torch.tensor(2, device=dev))  # keep root, [1], [1, 1]
    assert int(bb.cache_len) == 10
    nxt = torch.randint(0, 96, (3,), device=dev)
    causal = torch.ones(3, 3, dtype=torch.bool, device=dev).tril()
    ours = bb.logits(bb.forward_tree(nxt, causal, torch.arange(3, device=dev)))
    seq = torch.cat([prompt, tokens[path[:3]], nxt])
    torch.testing.assert_close(ours, hf(seq[None]).logits[0, -3:], rtol=1e-4, atol=1e-4)
