"""Peak GPU memory of one Medusa-2 QLoRA training step on a Llama-2-7B-shaped model (the seed promises < 16 GB).

No 7B weights are reachable here (FACTS.md), and memory does not depend on weight values, so the model is built
with random weights of the right shape, directly in 4-bit NF4 on the device: the skeleton is created on the
``meta`` device (no memory), then each decoder layer is materialised in bf16 on the device and its linear
projections are replaced by ``bnb.nn.Linear4bit`` quantized from random bf16 weights, one layer at a time. No
fp32 copy of the model ever exists, on the CPU or the GPU.

Then: LoRA (r=32) on every linear projection, 4 Medusa heads on the shared LM head, gradient checkpointing, and
one Medusa-2 step (KL(teacher || student) with the teacher = adapters disabled, plus the heads' loss) on
batch 4 x 1,024 tokens. Prints one JSON line.

    python benchmarks/qlora_memory.py              # Llama-2-7B shape, on the GPU
    python benchmarks/qlora_memory.py --tiny       # a tiny shape on the CPU (smoke test, seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

LLAMA2_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False,
)  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchConfig:
    tiny: bool = False
    """A tiny shape (CPU smoke test) instead of Llama-2-7B."""
    batch: int = 4
    """Sequences per step."""
    seq: int = 1024
    """Tokens per sequence."""
    lora_r: int = 32
    """LoRA rank."""
    num_heads: int = 4
    """Medusa heads (shared LM head)."""
    device: str | None = None
    """Device (None: cuda when available, else cpu)."""

    def __post_init__(self):
        for flag in ("batch", "seq", "lora_r", "num_heads"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(self, flag)}")


def quantize_linear(linear: nn.Linear) -> nn.Module:
    """``linear`` (bf16, on its device) as a ``bnb.nn.Linear4bit``: NF4, double quantization, bf16 compute."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
        compress_statistics=True, quant_type="nf4", device="meta",
    )  # fmt: skip
    weight = linear.weight.data
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    q.weight = q.weight.to(weight.device)  # quantizes
    return q


def build_4bit_llama(shape: dict, device: torch.device) -> nn.Module:
    """A random LlamaForCausalLM with 4-bit NF4 projections, built layer by layer on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**shape, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)  # shapes only, no memory
    finally:
        torch.set_default_dtype(default)

    def materialise(module: nn.Module) -> None:
        module.to_empty(device=device)
        for sub in module.modules():
            if isinstance(sub, nn.Embedding | nn.Linear):
                nn.init.normal_(sub.weight, std=0.02)
            elif hasattr(sub, "weight") and sub.weight is not None and sub.weight.dim() == 1:
                nn.init.ones_(sub.weight)  # RMSNorm

    for layer in model.model.layers:
        materialise(layer)  # one layer in bf16 at a time (random N(0, 0.02): memory does not depend on values)
        for name, child in list(layer.named_modules()):
            if isinstance(child, nn.Linear):
                parent_name, attr = name.rsplit(".", 1)
                setattr(layer.get_submodule(parent_name), attr, quantize_linear(child))
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialise(module)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffers were on meta
    model.requires_grad_(False)
    return model


def run(config: BenchConfig) -> dict:
    from peft import LoraConfig, get_peft_model

    from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
    from medusa_llama.train.objective import MedusaObjective

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shape = TINY if config.tiny else LLAMA2_7B
    t0 = time.time()
    model = build_4bit_llama(shape, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(r=config.lora_r, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(model, lora)
    heads_config = HeadsConfig(
        num_heads=config.num_heads, hidden_size=shape["hidden_size"], vocab_size=shape["vocab_size"],
        kind="medusa", lm_head="shared", base_model="random-llama",
    )  # fmt: skip
    heads = MedusaHeads(heads_config).to(device)
    objective = MedusaObjective(peft_model, heads, lambda_decay=0.8, chunk_tokens=2048).train()
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": lora_params, "lr": 5e-4}, {"params": list(heads.parameters()), "lr": 2e-3}], fused=cuda
    )
    build_s = time.time() - t0
    if cuda:
        torch.cuda.synchronize()
        weights_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    tokens = torch.randint(0, shape["vocab_size"], (config.batch, config.seq), device=device)  # (B, T)
    mask = torch.ones(config.batch, config.seq, device=device)  # (B, T)
    t1 = time.time()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        out = objective(tokens, mask, joint=True)
    out["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    result = {
        "shape": "tiny" if config.tiny else "llama-2-7b",
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        **asdict(config),
        "trainable_lora": sum(p.numel() for p in lora_params),
        "trainable_heads": sum(p.numel() for p in heads.parameters()),
        "loss": float(out["loss"].detach()),
        "lm_kl": float(out["lm_kl"]),
        "build_s": round(build_s, 2),
        "step_s": round(time.time() - t1, 2),
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result.update(weights_gb=round(weights_bytes / 2**30, 2), peak_gb=round(peak / 2**30, 2), peak_bytes=peak)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape, CPU smoke test")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; --tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; --tiny: 64)")
    parser.add_argument("--lora-r", type=int, default=BenchConfig.lora_r)
    parser.add_argument("--num-heads", type=int, default=BenchConfig.num_heads)
    parser.add_argument("--device", default=None, help="default: cuda when available (--tiny: cpu)")
    args = parser.parse_args(argv)
    small = {"batch": 2, "seq": 64, "device": "cpu"} if args.tiny else {}
    values = {k: v for k, v in vars(args).items() if v is not None}
    try:
        config = BenchConfig(**{**small, **values})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(run(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
