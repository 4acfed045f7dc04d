"""Medusa-1 / Medusa-2 training (Cai et al. 2024, Sec. 2.2): heads on a frozen backbone, then jointly with (Q)LoRA.

Stages (``--stage``):
- ``medusa1``: backbone frozen (bitwise unchanged), heads trained with sum_k lambda^k CE (or KL to the backbone's
  own distribution with ``--soft-targets``).
- ``medusa2``: peft LoRA on every linear projection of the backbone (on a 4-bit NF4 base with ``--qlora``), trained
  jointly with the heads; the LM head's loss is KL(teacher || student), the teacher being the same model with its
  adapters disabled. Heads learn at ``--lr`` x ``--head-lr-mult``.
- ``both``: ``medusa1`` for ``--medusa1-steps`` (heads warm-up), then ``medusa2``.

Step = one optimizer update over ``batch_size x grad_accum`` sequences per process. Data order is a function of
(seed, epoch) only, so ``--resume`` continues from ``save_dir/last`` with the exact same batches. Runs unchanged
under ``accelerate launch`` (DDP over processes, one process per GPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medusa_llama.decode.heads import HEAD_KINDS, LM_HEAD_MODES, HeadsConfig, MedusaHeads
from medusa_llama.errors import MedusaError
from medusa_llama.train.checkpoint import (
    CONFIG_NAME,
    LOG_NAME,
    EventLog,
    find_resumable,
    load_checkpoint,
    plot_curves,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medusa_llama.train.objective import MedusaObjective, causal_lm
from medusa_llama.train.prepare import TokenBlocks, load_meta

log = logging.getLogger(__name__)

STAGES = ("medusa1", "medusa2", "both")
RESUME_KEYS = ("model", "data", "num_heads", "head_kind", "lm_head", "num_layers", "stage", "qlora", "lora_r")


@dataclass
class TrainConfig:
    data: str = "data/sharegpt"
    """Prepared dataset directory (``medusa-llama prepare``)."""
    model: str | None = None
    """Backbone: HF id or directory (None: the embedded SmolLM2-135M-Instruct)."""
    save_dir: str = "runs/medusa"
    """Output: ``last/`` (resumable), ``best/`` (lowest validation loss), ``log.jsonl``, ``curves.png``."""
    num_heads: int = 4
    """K heads; head k (0-based) predicts token t+k+2. The seed's ``--offsets 1 2 3`` means 3 heads."""
    head_kind: str = "sequential"
    """``medusa`` (hidden state only) or ``sequential`` (also the previous path token, teacher forced)."""
    lm_head: str = "shared"
    """``shared``: the backbone's frozen LM head; ``own``: a trainable copy per head."""
    num_layers: int = 1
    """Residual blocks per head."""
    init_heads: str | None = None
    """Start from these trained heads (e.g. the Medusa-1 heads before a Medusa-2 run); must match the head flags."""
    stage: str = "medusa1"
    """``medusa1`` (frozen backbone), ``medusa2`` (joint LoRA), or ``both`` (medusa1 warm-up, then medusa2)."""
    medusa1_steps: int | None = None
    """Heads-only warm-up steps of ``--stage both`` (None: a quarter of the steps)."""
    epochs: float = 1.0
    """Passes over the training split (ignored when ``--max-steps`` is given)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides ``--epochs``."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate of the LoRA adapters (reference QLoRA recipe)."""
    head_lr_mult: float = 4.0
    """Heads learn at ``lr x head_lr_mult``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay (per stage for the adapters)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    lambda_decay: float = 0.8
    """Head k's loss weight is lambda^k."""
    soft_targets: bool = False
    """Self-distil the heads: KL to the backbone's distribution instead of CE to the data token."""
    lm_loss_weight: float = 1.0
    """Weight of the LM head's KL(teacher || student) in stage 2."""
    qlora: bool = False
    """Load the backbone in 4-bit NF4 (bitsandbytes) for stage 2."""
    lora_r: int = 32
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    grad_checkpointing: bool = False
    """Recompute backbone activations in backward (always on with ``--qlora``)."""
    eval_every: int = 200
    """Evaluate on the validation split every N steps (and at the end)."""
    eval_batches: int = 50
    """Validation micro-batches per evaluation."""
    save_every: int = 500
    """Write ``save_dir/last`` every N steps (and at the end)."""
    log_every: int = 10
    """Log training losses every N steps (the only host syncs of the loop)."""
    chunk_tokens: int = 2048
    """Positions per chunk in the heads' loss (bounds the (chunk, vocab) logits memory)."""
    resume: bool = False
    """Continue from ``save_dir/last``."""
    seed: int = 0
    """Seed for head init, data order and dropout."""
    bf16: bool = True
    """bf16 backbone and autocast on GPU (ignored on CPU)."""
    device: str | None = None
    """Device (None: the accelerate device, cuda when available)."""
    extra: dict = field(default_factory=dict)
    """Free-form notes stored in ``train_config.json`` (e.g. the seed's flags)."""

    def __post_init__(self):
        checks = {
            "--num-heads": self.num_heads >= 1,
            "--num-layers": self.num_layers >= 1,
            "--epochs": self.epochs > 0,
            "--batch-size": self.batch_size >= 1,
            "--grad-accum": self.grad_accum >= 1,
            "--lr": self.lr > 0,
            "--head-lr-mult": self.head_lr_mult > 0,
            "--warmup-steps": self.warmup_steps >= 0,
            "--lambda-decay": 0 < self.lambda_decay <= 1,
            "--lora-r": self.lora_r >= 1,
            "--lora-dropout": 0 <= self.lora_dropout < 1,
            "--eval-every": self.eval_every >= 1,
            "--eval-batches": self.eval_batches >= 1,
            "--save-every": self.save_every >= 1,
            "--log-every": self.log_every >= 1,
            "--chunk-tokens": self.chunk_tokens >= 1,
            "--max-steps": self.max_steps is None or self.max_steps >= 1,
            "--medusa1-steps": self.medusa1_steps is None or self.medusa1_steps >= 0,
        }
        for flag, ok in checks.items():
            if not ok:
                value = getattr(self, flag[2:].replace("-", "_"))
                raise ValueError(f"{flag} has an invalid value: {value!r}")
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.head_kind not in HEAD_KINDS:
            raise ValueError(f"--head-kind must be one of {HEAD_KINDS}, got {self.head_kind!r}")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"--lm-head must be one of {LM_HEAD_MODES}, got {self.lm_head!r}")
        if self.qlora and self.stage == "medusa1":
            raise ValueError("--qlora needs --stage medusa2 or both (medusa1 trains no adapter)")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    best_val_loss: float | None
    best_step: int | None
    val_top1: list[float]
    """Per-head validation top-1 accuracy at the best checkpoint."""
    save_dir: str

    def line(self) -> str:
        best = "n/a" if self.best_val_loss is None else f"{self.best_val_loss:.4f} (step {self.best_step})"
        top1 = " ".join(f"{a:.3f}" for a in self.val_top1) or "n/a"
        return (
            f"trained {self.steps} steps in {self.seconds:.0f} s; best val loss {best}; "
            f"per-head val top-1 {top1}; checkpoints in {self.save_dir}"
        )


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
    )
    heads = MedusaHeads(heads_config, base_lm_head=base.get_output_embeddings()).to(device=device, dtype=torch.float32)
    if config.init_heads:
        start = MedusaHeads.load(config.init_heads)
        mine, theirs = asdict(heads_config), asdict(start.config)
        changed = [k for k in mine if k != "base_model" and mine[k] != theirs[k]]
        if changed:
            raise MedusaError(f"--init-heads {config.init_heads} differ in {', '.join(changed)} from the head flags")
        heads.load_state_dict(start.state_dict())
    heads.requires_grad_(True)
    return model, peft_model, heads


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


@torch.no_grad()
def evaluate(objective, blocks: TokenBlocks, config: TrainConfig, joint: bool, accelerator, device) -> dict:
    """Validation losses and per-head top-1 / top-5 accuracy (weighted by the loss mask), over all processes."""
    K = config.num_heads
    n = min(len(blocks) // config.batch_size, config.eval_batches)
    if n == 0:
        return {}
    loss_sum = torch.zeros(K, device=device)  # per head: loss x count
    correct = torch.zeros(K, 2, device=device)  # per head: top-1, top-5 hits
    count = torch.zeros(K, device=device)  # per head: weighted positions
    scalars = torch.zeros(3, device=device)  # lm_kl, total loss, batches
    objective.eval()
    for b in range(accelerator.process_index, n, accelerator.num_processes):
        tokens, mask = blocks[np.arange(b * config.batch_size, (b + 1) * config.batch_size)]
        with autocast(device, config):
            out = objective(tokens.to(device), mask.to(device), joint=joint, metrics=True)
        loss_sum += out["head_loss"] * out["head_count"]
        correct += out["head_correct"]
        count += out["head_count"]
        scalars += torch.stack([out["lm_kl"], out["loss"].detach(), torch.ones((), device=device)])
    objective.train()
    flat = torch.cat([loss_sum, correct.flatten(), count, scalars])  # (4K + 3,)
    totals = accelerator.reduce(flat, reduction="sum").cpu()
    loss_sum, correct, count = totals[:K], totals[K : 3 * K].view(K, 2), totals[3 * K : 4 * K].clamp(min=1)
    lm_kl, loss, batches = totals[4 * K :].tolist()
    return {
        "val_loss": loss / max(batches, 1),
        "head_loss": (loss_sum / count).tolist(),
        "top1": (correct[:, 0] / count).tolist(),
        "top5": (correct[:, 1] / count).tolist(),
        "lm_kl": lm_kl / max(batches, 1),
    }


def autocast(device: torch.device, config: TrainConfig):
    if device.type == "cuda" and config.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(config: TrainConfig, on_step=None) -> TrainResult:
    """Run training; ``on_step(step, objective)`` runs after every optimizer step (tests inspect or interrupt)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    start_time = time.time()
    meta = load_meta(config.data)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.stage == "both")
    cpu = config.device == "cpu" or not torch.cuda.is_available()  # cpu=True also enables multi-process gloo
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
    device = torch.device(config.device) if config.device else accelerator.device
    main = accelerator.is_main_process
    info = log.info if main else lambda *args: None  # one copy of each message under DDP
    save_dir = Path(config.save_dir).expanduser()
    resume_from = find_resumable(save_dir) if config.resume else None
    if config.resume and resume_from is None:
        raise MedusaError(f"--resume: no checkpoint in {save_dir / 'last'}")
    if resume_from is not None:
        saved = json.loads((resume_from / CONFIG_NAME).read_text())
        changed = [k for k in RESUME_KEYS if saved.get(k) != asdict(config).get(k)]
        if changed:
            raise MedusaError(f"--resume: {resume_from} was trained with other {', '.join(changed)}")
    elif (save_dir / "last").exists():
        raise MedusaError(f"{save_dir} already holds a run: pass --resume to continue it or choose another --save-dir")

    train_blocks, val_blocks = TokenBlocks(config.data, "train", meta), TokenBlocks(config.data, "val", meta)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = Batches(train_blocks, config.batch_size, config.seed, rank, world)
    if batches.per_epoch < config.grad_accum:
        raise MedusaError(
            f"{config.data} has {len(train_blocks)} training blocks, fewer than one step of "
            f"{config.batch_size} x {config.grad_accum} x {accelerator.num_processes} processes"
        )
    steps_per_epoch = batches.per_epoch // config.grad_accum
    total = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    m1_steps = {"medusa1": total, "medusa2": 0}.get(config.stage, config.medusa1_steps)
    m1_steps = total // 4 if m1_steps is None else min(m1_steps, total)

    check_dataset(meta, config)
    model, peft_model, heads = build_model(config, device, accelerator.process_index)
    check_vocab(meta, config, heads.config.vocab_size)
    objective = MedusaObjective(
        model, heads, config.lambda_decay, config.soft_targets, config.lm_loss_weight, config.chunk_tokens
    )
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    groups = [{"params": list(heads.parameters()), "lr": config.lr * config.head_lr_mult}]
    lambdas = [WarmupCosine(0, config.warmup_steps, total)]
    if lora_params:
        groups.append({"params": lora_params, "lr": config.lr})
        lambdas.append(WarmupCosine(m1_steps, config.warmup_steps, total))
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    events = EventLog(save_dir / LOG_NAME, enabled=main)
    step, best = 0, {"val_loss": None, "step": None, "top1": []}
    if main:
        save_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        state = load_checkpoint(resume_from, heads, peft_model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, best = state["step"], state["best"]
        events.restore(resume_from / LOG_NAME)
        info("resumed from %s at step %d", resume_from, step)
    elif main:
        (save_dir / LOG_NAME).write_text("")
    if accelerator.num_processes > 1:
        objective = accelerator.prepare_model(objective, device_placement=False)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    config_dict = {**asdict(config), "total_steps": total, "medusa1_steps": m1_steps, "dataset_meta": meta["model"]}
    info(
        "training %d steps (%d per epoch, heads-only for %d) on %d blocks; %d trainable tensors (%.1f M values)",
        total,
        steps_per_epoch,
        m1_steps,
        len(train_blocks),
        len(trainable),
        sum(p.numel() for p in trainable) / 1e6,
    )

    def checkpoint(directory: str, resumable: bool) -> None:
        state = None
        if resumable:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "step": step,
                "best": best,
            }
        adapter = peft_model if peft_model is not None and (resumable or step > m1_steps) else None
        save_checkpoint(save_dir / directory, heads, adapter, config_dict, events.events, state)

    running = torch.zeros(config.num_heads + 2, device=device)  # head losses, lm_kl, loss: summed between logs
    since_log, tokens_seen, t_log = 0, 0, time.time()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not main)
    objective.train()
    while step < total:
        joint = step >= m1_steps
        if joint and step == m1_steps and peft_model is not None:
            events({"event": "stage", "step": step, "stage": "medusa2"})
        for m in range(config.grad_accum):
            tokens, mask = batches.micro_batch(step * config.grad_accum + m)
            if device.type == "cuda":
                tokens, mask = tokens.pin_memory(), mask.pin_memory()
            tokens = tokens.to(device, non_blocking=True)  # (B, T)
            mask = mask.to(device, non_blocking=True)  # (B, T)
            sync = m == config.grad_accum - 1 or accelerator.num_processes == 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(objective):
                with autocast(device, config):
                    out = objective(tokens, mask, joint=joint)
                (out["loss"] / config.grad_accum).backward()
            running += torch.cat([out["head_loss"], out["lm_kl"][None], out["loss"].detach()[None]])
            tokens_seen += tokens.numel() * accelerator.num_processes
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        since_log += config.grad_accum
        bar.update(1)
        if step % config.log_every == 0 or step == total:
            values = (running / since_log).tolist()  # the host sync of the loop
            now = time.time()
            event = {
                "event": "train",
                "step": step,
                "loss": values[-1],
                "head_loss": values[: config.num_heads],
                "lm_kl": values[-2],
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_seen / max(now - t_log, 1e-9),
                "time": now - start_time,
            }
            events(event)
            bar.set_postfix(loss=f"{values[-1]:.3f}", h1=f"{values[0]:.3f}")
            running.zero_()
            since_log, tokens_seen, t_log = 0, 0, now
        if step % config.eval_every == 0 or step == total:
            metrics = evaluate(objective, val_blocks, config, joint, accelerator, device)
            if metrics:
                events({"event": "eval", "step": step, **metrics})
                top1 = " ".join(f"{a:.3f}" for a in metrics["top1"])
                info("step %d: val loss %.4f, top-1 per head %s", step, metrics["val_loss"], top1)
                if best["val_loss"] is None or metrics["val_loss"] < best["val_loss"]:
                    best = {"val_loss": metrics["val_loss"], "step": step, "top1": metrics["top1"]}
                    if main:
                        checkpoint("best", resumable=False)
        if step % config.save_every == 0 or step == total:
            if main:
                checkpoint("last", resumable=True)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(step, objective)
    bar.close()
    if main:
        if best["val_loss"] is None:  # no validation data: the final state is the best we know
            checkpoint("best", resumable=False)
        plot_curves(events.events, save_dir / "curves.png")
    result = TrainResult(step, time.time() - start_time, best["val_loss"], best["step"], best["top1"], str(save_dir))
    if main:
        events({"event": "done", **asdict(result)})
    return result
