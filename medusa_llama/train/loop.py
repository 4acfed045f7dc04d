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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medusa_llama.decode.heads import HEAD_KINDS, LM_HEAD_MODES
from medusa_llama.errors import MedusaError
from medusa_llama.train.blocks import TokenBlocks, load_meta
from medusa_llama.train.build import Batches, build_model, build_optimizer, check_dataset, check_vocab
from medusa_llama.train.checkpoint import (
    CONFIG_NAME,
    LOG_NAME,
    EventLog,
    check_checkpoint_slots,
    find_resumable,
    load_checkpoint,
    plot_curves,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medusa_llama.train.objective import MedusaObjective
from medusa_llama.train.outputs import check_output_dir

log = logging.getLogger(__name__)

STAGES = ("medusa1", "medusa2", "both")
RESUME_KEYS = (
    "model", "data", "num_heads", "head_kind", "lm_head", "num_layers", "prefix_attention", "prefix_token_input",
    "stage", "qlora", "lora_r",
)  # fmt: skip


@dataclass
class TrainConfig:
    data: str = "data/sharegpt"
    """Prepared dataset directory (``medusa-llama prepare``)."""
    model: str | None = None
    """Backbone: HF id or directory (None: the embedded SmolLM2-135M-Instruct)."""
    save_dir: str = "runs/medusa"
    """Output: ``last/`` (resumable), ``best/`` (lowest validation loss of the final stage), ``log.jsonl``, curves."""
    num_heads: int = 4
    """K heads; head k (0-based) predicts token t+k+2. The seed's ``--offsets 1 2 3`` means 3 heads."""
    head_kind: str = "sequential"
    """``medusa`` (hidden state only) or ``sequential`` (also the previous path token, teacher forced)."""
    lm_head: str = "shared"
    """``shared``: the backbone's frozen LM head; ``own``: a trainable copy per head."""
    num_layers: int = 1
    """Residual blocks per head."""
    prefix_attention: bool = False
    """Hydra++ prefix attention: the heads read one extra decoder layer (trained with them) over the backbone's
    hidden states instead of the last one. Not exportable to vLLM / FasterDecoding; decodes one sequence at a time."""
    prefix_token_input: bool = False
    """EAGLE-style token input for the prefix layer (needs --prefix-attention): at each position it also reads the
    embedding of the token that follows (h_t + W e(x_{t+1}), W zero at start). In decoding that token is the committed
    one, known before the heads run, so decoding stays lossless. Not exportable either."""
    init_heads: str | None = None
    """Start from these trained heads (e.g. the Medusa-1 heads before a Medusa-2 run); must match the head flags
    (heads without prefix attention may start heads with it, prefix heads without the token input heads with it,
    and shared-LM-head heads ``--lm-head own`` heads: the new prefix layer, or its new token input, starts as the
    identity, each new own LM head as a copy of the base one)."""
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
    """Heads learn at ``lr x head_lr_mult``; 0 (``--stage medusa2`` only) freezes them: the adapter alone learns,
    from the heads' loss and the LM KL."""
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
            "--head-lr-mult": self.head_lr_mult >= 0,
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
        if self.prefix_token_input and not self.prefix_attention:
            raise ValueError("--prefix-token-input needs --prefix-attention (it is an input of the prefix layer)")
        if self.head_lr_mult == 0 and self.stage != "medusa2":
            raise ValueError("--head-lr-mult 0 (frozen heads) needs --stage medusa2 (the adapter is all that trains)")
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


class Trainer:
    """One training run, as named steps: ``__init__`` sets up (or resumes); per optimizer step ``train_step``, then
    ``log_losses``, ``validate`` and ``save_last`` when due; ``finish`` writes the curves and the result."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config, self.start_time = config, time.time()
        self.save_dir = Path(config.save_dir).expanduser()
        check_output_dir(self.save_dir, "--save-dir")  # a file there fails now, not after loading the model
        check_checkpoint_slots(self.save_dir)
        meta = load_meta(config.data)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=config.stage == "both")
        cpu = config.device == "cpu" or not torch.cuda.is_available()  # cpu=True also enables multi-process gloo
        self.accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
        self.device = torch.device(config.device) if config.device else self.accelerator.device
        self.main = self.accelerator.is_main_process
        resume_from = self._resume_point()
        self._plan(meta)
        check_dataset(meta, config)
        self.model, self.peft_model, self.heads = build_model(config, self.device, self.accelerator.process_index)
        check_vocab(meta, config, self.heads.config.vocab_size)
        self.objective = MedusaObjective(
            self.model, self.heads, config.lambda_decay, config.soft_targets, config.lm_loss_weight, config.chunk_tokens
        )
        self.optimizer, self.scheduler = build_optimizer(
            config, self.model, self.heads, self.total, self.m1_steps, self.device
        )
        self.events = EventLog(self.save_dir / LOG_NAME, enabled=self.main)
        self.step, self.joint = 0, False
        self.best: dict[str, dict] = {}
        """Per stage (``medusa1`` / ``medusa2``): val_loss, step, top1 of its lowest validation loss. Stages are not
        compared: stage 2's loss adds the LM KL term."""
        if self.main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            self._restore(resume_from)
        elif self.main:
            (self.save_dir / LOG_NAME).write_text("")
        if self.accelerator.num_processes > 1:
            self.objective = self.accelerator.prepare_model(self.objective, device_placement=False)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.config_dict = {
            **asdict(config),
            "total_steps": self.total,
            "medusa1_steps": self.m1_steps,
            "dataset_meta": meta["model"],
        }
        self.info(
            "training %d steps (%d per epoch, heads-only for %d) on %d blocks; %d trainable tensors (%.1f M values)",
            self.total,
            self.steps_per_epoch,
            self.m1_steps,
            len(self.train_blocks),
            len(self.trainable),
            sum(p.numel() for p in self.trainable) / 1e6,
        )
        self.running = torch.zeros(config.num_heads + 2, device=self.device)  # head losses, lm_kl, loss: summed
        self.since_log, self.tokens_seen, self.t_log = 0, 0, time.time()
        self.bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", disable=not self.main)
        self.objective.train()

    def info(self, *args) -> None:
        if self.main:  # one copy of each message under DDP
            log.info(*args)

    def _resume_point(self) -> Path | None:
        """The checkpoint ``--resume`` continues (checked against the flags), or None for a new run."""
        config, save_dir = self.config, self.save_dir
        if not config.resume:
            if (save_dir / "last").exists():
                raise MedusaError(
                    f"{save_dir} already holds a run: pass --resume to continue it or choose another --save-dir"
                )
            return None
        resume_from = find_resumable(save_dir)
        if resume_from is None:
            raise MedusaError(f"--resume: no checkpoint in {save_dir / 'last'}")
        saved = json.loads((resume_from / CONFIG_NAME).read_text())
        # A key missing from an older run's file held its default then (the prefix options came later).
        changed = [k for k in RESUME_KEYS if saved.get(k, getattr(TrainConfig, k, None)) != asdict(config).get(k)]
        if changed:
            raise MedusaError(f"--resume: {resume_from} was trained with other {', '.join(changed)}")
        return resume_from

    def _plan(self, meta: dict) -> None:
        """Data splits, batches and the step counts: ``total`` steps, the first ``m1_steps`` heads-only."""
        config, world = self.config, self.accelerator.num_processes
        self.train_blocks = TokenBlocks(config.data, "train", meta)
        self.val_blocks = TokenBlocks(config.data, "val", meta)
        self.batches = Batches(self.train_blocks, config.batch_size, config.seed, self.accelerator.process_index, world)
        if self.batches.per_epoch < config.grad_accum:
            raise MedusaError(
                f"{config.data} has {len(self.train_blocks)} training blocks, fewer than one step of "
                f"{config.batch_size} x {config.grad_accum} x {world} processes"
            )
        self.steps_per_epoch = self.batches.per_epoch // config.grad_accum
        self.total = config.max_steps or max(1, int(config.epochs * self.steps_per_epoch))
        m1_steps = {"medusa1": self.total, "medusa2": 0}.get(config.stage, config.medusa1_steps)
        self.m1_steps = self.total // 4 if m1_steps is None else min(m1_steps, self.total)

    def _restore(self, resume_from: Path) -> None:
        state = load_checkpoint(resume_from, self.heads, self.peft_model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.best = state["step"], state["best"]
        self.events.restore(resume_from / LOG_NAME)
        logged = [e["time"] for e in self.events.events if e.get("event") == "train" and "time" in e]
        if logged:  # the clock goes on from the checkpoint's last logged step: times and `done` count the whole run
            self.start_time = time.time() - logged[-1]
        self.info("resumed from %s at step %d", resume_from, self.step)

    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.total

    @property
    def stage(self) -> str:
        """The stage of the last step taken."""
        return "medusa2" if self.joint else "medusa1"

    def train_step(self) -> None:
        """One optimizer update over ``grad_accum`` micro-batches: heads only before ``m1_steps``, then joint."""
        config, accelerator, device = self.config, self.accelerator, self.device
        self.joint = self.step >= self.m1_steps
        if self.joint and self.step == self.m1_steps and self.peft_model is not None:
            self.events({"event": "stage", "step": self.step, "stage": "medusa2"})
        for m in range(config.grad_accum):
            tokens, mask = self.batches.micro_batch(self.step * config.grad_accum + m)
            if device.type == "cuda":
                tokens, mask = tokens.pin_memory(), mask.pin_memory()
            tokens = tokens.to(device, non_blocking=True)  # (B, T)
            mask = mask.to(device, non_blocking=True)  # (B, T)
            sync = m == config.grad_accum - 1 or accelerator.num_processes == 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.objective):
                with autocast(device, config):
                    out = self.objective(tokens, mask, joint=self.joint)
                (out["loss"] / config.grad_accum).backward()
            self.running += torch.cat([out["head_loss"], out["lm_kl"][None], out["loss"].detach()[None]])
            self.tokens_seen += tokens.numel() * accelerator.num_processes
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.since_log += config.grad_accum
        self.bar.update(1)

    def log_losses(self) -> None:
        """Mean training losses since the last log: the loop's only host sync."""
        values = (self.running / self.since_log).tolist()
        now = time.time()
        K = self.config.num_heads
        self.events(
            {
                "event": "train",
                "step": self.step,
                "loss": values[-1],
                "head_loss": values[:K],
                "lm_kl": values[-2],
                "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": self.tokens_seen / max(now - self.t_log, 1e-9),
                "time": now - self.start_time,
            }
        )
        self.bar.set_postfix(loss=f"{values[-1]:.3f}", h1=f"{values[0]:.3f}")
        self.running.zero_()
        self.since_log, self.tokens_seen, self.t_log = 0, 0, now

    def validate(self) -> None:
        """Validation metrics; ``best/`` follows the lowest validation loss of the current stage."""
        metrics = evaluate(self.objective, self.val_blocks, self.config, self.joint, self.accelerator, self.device)
        if not metrics:
            return
        self.events({"event": "eval", "step": self.step, **metrics})
        top1 = " ".join(f"{a:.3f}" for a in metrics["top1"])
        self.info("step %d: val loss %.4f, top-1 per head %s", self.step, metrics["val_loss"], top1)
        best = self.best.get(self.stage)
        if best is None or metrics["val_loss"] < best["val_loss"]:
            self.best[self.stage] = {"val_loss": metrics["val_loss"], "step": self.step, "top1": metrics["top1"]}
            if self.main:
                self.checkpoint("best", resumable=False)

    def save_last(self) -> None:
        if self.main:
            self.checkpoint("last", resumable=True)
        self.accelerator.wait_for_everyone()

    def checkpoint(self, directory: str, resumable: bool) -> None:
        """Write ``save_dir/directory``: heads, the adapter once stage 2 ran (always in ``last/``), the state."""
        state = None
        if resumable:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "step": self.step,
                "best": self.best,
            }
        with_adapter = self.peft_model is not None and (resumable or self.step > self.m1_steps)
        adapter = self.peft_model if with_adapter else None
        save_checkpoint(self.save_dir / directory, self.heads, adapter, self.config_dict, self.events.events, state)

    def finish(self) -> TrainResult:
        """Close the run: ``best/`` from the final state if nothing was validated, the curves, the result."""
        self.bar.close()
        final_stage = "medusa2" if self.total > self.m1_steps else "medusa1"
        best = self.best.get(final_stage)
        if self.main:
            if best is None:  # no validation data: the final state is the best we know
                self.checkpoint("best", resumable=False)
            plot_curves(self.events.events, self.save_dir / "curves.png")
        best = best or {"val_loss": None, "step": None, "top1": []}
        seconds = time.time() - self.start_time
        result = TrainResult(self.step, seconds, best["val_loss"], best["step"], best["top1"], str(self.save_dir))
        if self.main:
            self.events({"event": "done", **asdict(result)})
        return result


def train(config: TrainConfig, on_step=None) -> TrainResult:
    """Run training; ``on_step(step, objective)`` runs after every optimizer step (tests inspect or interrupt)."""
    run = Trainer(config)
    while run.step < run.total:
        run.train_step()
        if run.due(config.log_every):
            run.log_losses()
        if run.due(config.eval_every):
            run.validate()
        if run.due(config.save_every):
            run.save_last()
        if on_step is not None:
            on_step(run.step, run.objective)
    return run.finish()
