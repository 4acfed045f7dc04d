"""Training checkpoints (atomic, resumable), the JSONL event log and the loss / accuracy curves.

A checkpoint directory holds what a user needs: ``medusa_heads.safetensors`` + ``config.json`` (the heads), the
LoRA adapter when stage 2 ran (``adapter_config.json`` + ``adapter_model.safetensors`` from peft's
``save_pretrained``, so the directory itself is the seed's ``--adapter_dir``), ``train_config.json``, ``log.jsonl``
and ``curves.png``; ``last/`` also holds what resuming needs (``trainer_state.pt``: optimizer, scheduler, RNG
states, step). It is written into a temporary sibling directory and renamed into place, so an interrupted save
never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from medusa_llama.decode.heads import WEIGHTS_NAME
from medusa_llama.errors import MedusaError

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
STATE_NAME = "trainer_state.pt"
CONFIG_NAME = "train_config.json"
ADAPTER_NAME = "adapter_model.safetensors"


class EventLog:
    """Appends one JSON object per event to ``save_dir/log.jsonl`` and keeps them for the curves."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.events: list[dict] = []

    def restore(self, checkpoint_log: Path) -> None:
        """Rewind the log to a checkpoint's copy (events after it are replayed by the resumed run)."""
        self.events = [json.loads(line) for line in checkpoint_log.read_text().splitlines() if line.strip()]
        if self.enabled:
            self.path.write_text("".join(json.dumps(e) + "\n" for e in self.events))

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event) + "\n")


def plot_curves(events: list[dict], path: Path) -> None:
    """Train/val loss and per-head validation top-1 accuracy against the step (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([e["step"] for e in train], [e["loss"] for e in train], label="train")
    if evals:
        ax_loss.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
        for k in range(len(evals[0]["top1"])):
            ax_acc.plot([e["step"] for e in evals], [e["top1"][k] for e in evals], "o-", label=f"head {k + 1} top-1")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="validation top-1 per head", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final``; the previous version survives as ``.old`` until the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    final: Path,
    heads,
    peft_model,
    train_config: dict,
    events: list[dict],
    trainer_state: dict | None = None,
) -> None:
    """Write a checkpoint atomically. ``peft_model`` None: no adapter; ``trainer_state`` None: not resumable."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        heads.save(tmp)
        if peft_model is not None:
            peft_model.save_pretrained(tmp)  # adapter_config.json beside the heads: the seed's --adapter_dir best
        (tmp / CONFIG_NAME).write_text(json.dumps(train_config, indent=2))
        (tmp / LOG_NAME).write_text("".join(json.dumps(e) + "\n" for e in events))
        plot_curves(events, tmp / CURVES_NAME)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_NAME)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_resumable(save_dir: Path) -> Path | None:
    """``save_dir/last`` (or its ``.old`` copy if a save was interrupted mid-swap), or None."""
    for candidate in (save_dir / "last", save_dir / ".last.old"):
        if (candidate / STATE_NAME).is_file():
            return candidate
    return None


def load_checkpoint(directory: Path, heads, peft_model) -> dict:
    """Load heads (and adapter) weights in place; return the trainer state (optimizer, scheduler, RNG, step)."""
    from safetensors.torch import load_file

    try:
        state = load_file(directory / WEIGHTS_NAME)
        heads.load_state_dict(state)  # copies into the existing parameters (device and dtype kept)
        if peft_model is not None:
            from peft import set_peft_model_state_dict

            adapter = load_file(directory / ADAPTER_NAME)
            result = set_peft_model_state_dict(peft_model, adapter)
            if getattr(result, "unexpected_keys", None):
                raise MedusaError(f"adapter in {directory} does not match the model: {result.unexpected_keys[:3]}")
        return torch.load(directory / STATE_NAME, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, KeyError) as exc:
        raise MedusaError(f"cannot resume from {directory}: {str(exc).splitlines()[0]}") from exc
