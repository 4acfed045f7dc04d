"""What a training run is built from: the model (backbone, LoRA, heads), the optimizer and its schedule, the batches.

``build_model`` loads the backbone (4-bit NF4 with ``--qlora``), wraps it in peft LoRA for stage 2 and creates the
heads; ``build_optimizer`` gives heads and adapters their own learning rates and warm-up/cosine schedules (the
adapters' starting with stage 2); ``Batches`` cuts micro-batches out of a per-epoch permutation that depends
only on (seed, epoch), which is what makes ``--resume`` exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
from medusa_llama.errors import MedusaError
from medusa_llama.train.blocks import TokenBlocks
from medusa_llama.train.objective import causal_lm

if TYPE_CHECKING:
    from medusa_llama.train.loop import TrainConfig


class WarmupCosine:
    """LR factor: 0 before ``start``, linear warm-up over ``warmup`` steps, cosine to 0 at ``total``."""

    def __init__(self, start: int, warmup: int, total: int):
        self.start, self.warmup, self.total = start, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.start:
            return 0.0
        s = step - self.start
        if s < self.warmup:
            return (s + 1) / self.warmup
        span = max(self.total - self.start - self.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min((s - self.warmup) / span, 1.0)))


def check_dataset(meta: dict, config: TrainConfig) -> None:
    """Refuse data tokenized for another model (unless its tokenizer is the same) or too short for the heads."""
    from medusa_llama.loading import load_tokenizer, model_name
    from medusa_llama.train.prepare import tokenizer_fingerprint

    if meta["model"] != model_name(config.model):
        try:
            same = tokenizer_fingerprint(load_tokenizer(config.model)) == meta["tokenizer_fingerprint"]
        except (MedusaError, OSError, ValueError):
            same = False
        if not same:
            raise MedusaError(
                f"{config.data} was tokenized for {meta['model']!r}, not {model_name(config.model)!r}: "
                f"re-run `medusa-llama prepare --model {config.model}`"
            )
    if meta["block_size"] < config.num_heads + 3:
        raise MedusaError(f"block size {meta['block_size']} is too short for {config.num_heads} heads")


def check_vocab(meta: dict, config: TrainConfig, vocab_size: int) -> None:
    if meta["vocab_size"] > vocab_size:
        raise MedusaError(f"{config.data} has token ids up to {meta['vocab_size']}, the model's vocab is {vocab_size}")


def build_model(config: TrainConfig, device: torch.device, process_index: int):
    """Load the backbone (4-bit for QLoRA), add LoRA for stage 2, create the heads. Returns (model, peft?, heads)."""
    from medusa_llama.loading import load_model, model_name

    torch.manual_seed(config.seed)  # LoRA and head initialisation depend on nothing else
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and config.bf16 else torch.float32
    quant = None
    if config.qlora:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    model = load_model(config.model, dtype=dtype, device=device, quantization_config=quant)
    model.requires_grad_(False)
    peft_model = None
    if config.stage != "medusa1":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        ckpt_kwargs = {"use_reentrant": False}
        if config.qlora:
            # It freezes everything and turns on gradient checkpointing: the heads are created after it.
            model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=ckpt_kwargs)
        elif config.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            model.enable_input_require_grads()
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear",  # every linear projection of the blocks; peft leaves the LM head out
            task_type="CAUSAL_LM",
        )
        model = peft_model = get_peft_model(model, lora)
    base = causal_lm(model)
    hidden, vocab = base.config.hidden_size, base.get_output_embeddings().weight.shape[0]
    heads_config = HeadsConfig(
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        hidden_size=hidden,
        vocab_size=vocab,
        kind=config.head_kind,
        lm_head=config.lm_head,
        base_model=model_name(config.model),
        prefix_attention=config.prefix_attention,
        prefix_num_heads=base.config.num_attention_heads,
        prefix_token_input=config.prefix_token_input,
        rope_theta=backbone_rope_theta(base.config),
    )
    heads = MedusaHeads(heads_config, base_lm_head=base.get_output_embeddings()).to(device=device, dtype=torch.float32)
    if config.init_heads:
        init_heads(heads, config.init_heads)
    heads.requires_grad_(config.head_lr_mult > 0)  # 0: frozen heads (their loss still reaches the adapter)
    return model, peft_model, heads


def backbone_rope_theta(config) -> float:
    """The backbone's RoPE base, for the prefix layer: ``rope_theta`` (transformers < 5) or
    ``rope_parameters["rope_theta"]`` (transformers 5); ``HeadsConfig``'s default where neither is set."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    return float(theta or HeadsConfig.rope_theta)


PREFIX_FIELDS = ("prefix_attention", "prefix_num_heads", "prefix_intermediate_size", "rope_theta", "prefix_token_input")
TOKEN_INPUT_WEIGHT = "prefix.token.weight"
"""The prefix layer's token input (``--prefix-token-input``): the one tensor heads may start without."""


def init_heads(heads: MedusaHeads, path: str) -> None:
    """Copy the heads at ``path`` into ``heads``; their configs must match, except that heads without prefix attention
    may start heads with it (the new prefix layer keeps its identity init, so they start proposing the same), prefix
    heads without the token input heads with it (the new ``prefix.token`` stays zero: the same again), and heads
    sharing the base LM head heads with their own (``--lm-head own``: each own LM head keeps its init, a copy of the
    base LM head: the same once more)."""
    start = MedusaHeads.load(path)
    mine, theirs = asdict(heads.config), asdict(start.config)
    ignored: list[str] = []
    new: list[str] = []
    if not start.config.prefix_attention:
        ignored += PREFIX_FIELDS
        new += [k for k in heads.state_dict() if k.startswith("prefix.")]
    elif heads.config.prefix_token_input and not start.config.prefix_token_input:
        ignored.append("prefix_token_input")
        new.append(TOKEN_INPUT_WEIGHT)
    if heads.config.lm_head == "own" and start.config.lm_head == "shared":
        ignored.append("lm_head")
        new += [k for k in heads.state_dict() if k.startswith("lm_heads.")]
    changed = [k for k in mine if k not in ("base_model", *ignored) and mine[k] != theirs[k]]
    if changed:
        raise MedusaError(f"--init-heads {path} differ in {', '.join(changed)} from the head flags")
    missing, unexpected = heads.load_state_dict(start.state_dict(), strict=False)
    if unexpected or set(missing) != set(new):  # the configs match: exactly the new tensors keep their init
        raise MedusaError(f"--init-heads {path}: tensors missing {sorted(set(missing) - set(new))}, extra {unexpected}")


class Batches:
    """Deterministic batches: micro-batch ``i`` of process ``rank`` is a slice of the epoch's permutation."""

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int, rank: int, world: int):
        self.blocks, self.batch_size, self.seed, self.rank, self.world = blocks, batch_size, seed, rank, world
        self.per_epoch = len(blocks) // (batch_size * world)  # micro-batches per epoch per process
        self._perm: tuple[int, np.ndarray] | None = None

    def micro_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks)))
        start = (j * self.world + self.rank) * self.batch_size
        return self.blocks[self._perm[1][start : start + self.batch_size]]


def build_optimizer(config: TrainConfig, model, heads, total: int, m1_steps: int, device: torch.device):
    """AdamW over the heads (at ``lr x head_lr_mult``; none when 0: frozen) and the LoRA tensors, with their LambdaLR
    schedule."""
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    groups, lambdas = [], []
    if config.head_lr_mult > 0:
        groups.append({"params": list(heads.parameters()), "lr": config.lr * config.head_lr_mult})
        lambdas.append(WarmupCosine(0, config.warmup_steps, total))
    if lora_params:
        groups.append({"params": lora_params, "lr": config.lr})
        lambdas.append(WarmupCosine(m1_steps, config.warmup_steps, total))
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
