"""Training checkpoints (atomic, resumable, loaded without running code), the JSONL event log and the curves.

A checkpoint directory holds what a user needs: ``medusa_heads.safetensors`` + ``config.json`` (the heads), the
LoRA adapter when stage 2 ran (``adapter_config.json`` + ``adapter_model.safetensors`` from peft's
``save_pretrained``, so the directory itself is the seed's ``--adapter_dir``), ``train_config.json``, ``log.jsonl``
and ``curves.png``; ``last/`` also holds what resuming needs: ``trainer_state.safetensors`` (every tensor of the
optimizer, scheduler and RNG states) and ``trainer_state.json`` (the structure around them, the step counter,
the best validation losses, numpy's and Python's RNG states as lists). Loading reads only safetensors and JSON:
a pickle (the ``trainer_state.pt`` of older versions) is never loaded, since unpickling can run any code. A
checkpoint is written into a temporary sibling directory and renamed into place (``outputs``), so an
interrupted save leaves the previous checkpoint and nothing else.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from medusa_llama.decode.heads import WEIGHTS_NAME
from medusa_llama.errors import MedusaError
from medusa_llama.train.outputs import replace_dir, staging_dir

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"
"""The pickle of older versions: recognised in order to refuse it, never loaded."""
STATE_FORMAT = 1
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
    """Every RNG state training can touch: torch (and cuda) as tensors, numpy and Python as JSON lists."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# A trainer state is a tree of dicts, lists, tuples, numbers, strings and tensors. Tensors go to safetensors by a
# path name; the rest is JSON, where a tensor is {TENSOR: name}, a tuple {TUPLE: [...]} and a dict whose keys
# are not all strings (the optimizer's per-parameter state) {ITEMS: [[key, value], ...]}.
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


def flatten_state(obj, tensors: dict[str, torch.Tensor], name: str = "state"):
    """``obj`` as JSON-ready data; its tensors are added to ``tensors`` under their path ``name``."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous()
        return {TENSOR: name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not {TENSOR, TUPLE, ITEMS} & obj.keys():
            return {k: flatten_state(v, tensors, f"{name}.{k}") for k, v in obj.items()}
        return {ITEMS: [[k, flatten_state(v, tensors, f"{name}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple | list):
        items = [flatten_state(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]
        return {TUPLE: items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {name} of a trainer state")


def unflatten_state(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of ``flatten_state``."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if TENSOR in obj:
        return tensors[obj[TENSOR]]
    if TUPLE in obj:
        return tuple(unflatten_state(v, tensors) for v in obj[TUPLE])
    if ITEMS in obj:
        return {k: unflatten_state(v, tensors) for k, v in obj[ITEMS]}
    return {k: unflatten_state(v, tensors) for k, v in obj.items()}


def save_trainer_state(directory: Path, state: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = flatten_state(state, tensors)
    save_file(tensors, directory / STATE_TENSORS)
    (directory / STATE_JSON).write_text(json.dumps({"format": STATE_FORMAT, "state": tree}))


def load_trainer_state(directory: Path) -> dict:
    """The trainer state of a checkpoint, read with safetensors and json only."""
    from safetensors.torch import load_file

    saved = json.loads((directory / STATE_JSON).read_text())
    if saved.get("format") != STATE_FORMAT:
        raise MedusaError(f"{directory / STATE_JSON} has format {saved.get('format')}, expected {STATE_FORMAT}")
    return unflatten_state(saved["state"], load_file(directory / STATE_TENSORS))


def check_checkpoint_slots(save_dir: Path) -> None:
    """Refuse a ``save_dir`` whose ``last/`` or ``best/`` exists but was not written by this project: saving replaces
    those two directories, and nothing the user wrote may be lost."""
    for name in ("last", "best"):
        slot = save_dir / name
        if slot.exists() and not (slot / CONFIG_NAME).is_file():
            raise MedusaError(
                f"--save-dir {save_dir}: {slot} exists and is not a checkpoint medusa-llama wrote (no {CONFIG_NAME}); "
                "choose another --save-dir"
            )


def save_checkpoint(
    final: Path,
    heads,
    peft_model,
    train_config: dict,
    events: list[dict],
    trainer_state: dict | None = None,
) -> None:
    """Write a checkpoint atomically. ``peft_model`` None: no adapter; ``trainer_state`` None: not resumable."""
    check_checkpoint_slots(final.parent)
    with staging_dir(final) as tmp:
        heads.save(tmp)
        if peft_model is not None:
            peft_model.save_pretrained(tmp)  # adapter_config.json beside the heads: the seed's --adapter_dir best
        (tmp / CONFIG_NAME).write_text(json.dumps(train_config, indent=2))
        (tmp / LOG_NAME).write_text("".join(json.dumps(e) + "\n" for e in events))
        plot_curves(events, tmp / CURVES_NAME)
        if trainer_state is not None:
            save_trainer_state(tmp, trainer_state)
        replace_dir(tmp, final, final.with_name(f".{final.name}.old"))


def find_resumable(save_dir: Path) -> Path | None:
    """``save_dir/last`` (or its ``.old`` copy if a save was killed mid-swap), or None.

    A ``last/`` holding only the pickled state of older versions is refused with a ``MedusaError``, unread.
    """
    for candidate in (save_dir / "last", save_dir / ".last.old"):
        if (candidate / STATE_JSON).is_file():
            return candidate
    legacy = save_dir / "last" / LEGACY_STATE
    if legacy.is_file():
        raise MedusaError(
            f"--resume: {legacy} is a pickle from an older version and is never loaded (unpickling can run code); "
            f"start a new run, e.g. from its heads with --init-heads {legacy.parent}"
        )
    return None


def load_checkpoint(directory: Path, heads, peft_model) -> dict:
    """Load heads (and adapter) weights in place; return the trainer state (optimizer, scheduler, RNG, step)."""
    from safetensors import SafetensorError
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
        return load_trainer_state(directory)
    except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as exc:
        raise MedusaError(f"cannot resume from {directory}: {(str(exc).splitlines() or [repr(exc)])[0]}") from exc
