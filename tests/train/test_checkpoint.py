"""Checkpoints: the trainer state round-trips through safetensors + JSON, an interrupted save leaves the last one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
from medusa_llama.train import checkpoint
from medusa_llama.train.build import WarmupCosine
from medusa_llama.train.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    save_trainer_state,
    set_rng_state,
)


def _optimizer():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.01}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [WarmupCosine(0, 2, 9), WarmupCosine(3, 2, 9)])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_trainer_state_round_trips_without_pickle(tmp_path):
    optimizer, scheduler = _optimizer()
    np.random.seed(1)
    np.random.randn()  # a cached Gaussian in numpy's state
    random.seed(2)
    random.gauss(0, 1)  # and in Python's
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "step": 7,
        "best": {"medusa1": {"val_loss": 0.1 + 0.2, "step": 3, "top1": [0.5]}},
    }
    expected = _draws()
    save_trainer_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE_JSON, STATE_TENSORS])
    json.loads((tmp_path / STATE_JSON).read_text())  # plain JSON beside the tensors
    loaded = load_trainer_state(tmp_path)
    assert loaded["step"] == 7 and loaded["best"] == state["best"]
    assert loaded["scheduler"] == state["scheduler"]
    torch.testing.assert_close(loaded["optimizer"], state["optimizer"], rtol=0, atol=0)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    set_rng_state(loaded["rng"])
    assert _draws() == expected  # torch, numpy and Python generators continue exactly
    fresh, fresh_scheduler = _optimizer()
    fresh.load_state_dict(loaded["optimizer"])
    fresh_scheduler.load_state_dict(loaded["scheduler"])
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def _heads() -> MedusaHeads:
    return MedusaHeads(HeadsConfig(num_heads=2, hidden_size=8, vocab_size=16, kind="medusa"))


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_interrupted_save_leaves_the_previous_checkpoint(where, tmp_path, monkeypatch):
    final = tmp_path / "last"
    save_checkpoint(final, _heads(), None, {"step": 1}, [], {"step": 1})
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    if where == "writing":

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(checkpoint, "plot_curves", interrupt)
    else:  # between moving the previous checkpoint aside and renaming the new one into place
        rename, calls = Path.rename, []

        def rename_then_interrupt(self, target):
            calls.append(target)
            if len(calls) == 2:  # the new checkpoint's rename into place
                raise KeyboardInterrupt
            return rename(self, target)

        monkeypatch.setattr(Path, "rename", rename_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(final, _heads(), None, {"step": 2}, [], {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
