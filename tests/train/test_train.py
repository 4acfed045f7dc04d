"""Training: label offsets, frozen backbone, loss decrease, QLoRA trainables/checkpoint, resume, teacher, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_heads, tiny_llama

from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
from medusa_llama.errors import MedusaError
from medusa_llama.loading import model_name
from medusa_llama.train.blocks import write_blocks
from medusa_llama.train.loop import TrainConfig, train
from medusa_llama.train.objective import MedusaObjective, final_hidden, teacher_context

VOCAB, BLOCK = 96, 32
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
    return path


def write_dataset(directory: Path, model: str, n_train: int = 48, n_val: int = 8, model_tag: str | None = None):
    """Blocks cut from one repeated random sequence: learnable, so heads can improve quickly."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, VOCAB, size=24)
    stream = np.tile(pattern, 8)

    def blocks(n):
        starts = rng.integers(0, 24, size=n)
        return np.stack([stream[s : s + BLOCK] for s in starts])

    for split, n in (("train", n_train), ("val", n_val)):
        tokens = blocks(n)
        mask = np.ones_like(tokens)
        mask[:, :4] = 0
        write_blocks(directory, split, tokens, mask)
    meta = {
        "format": 1,
        "model": model_tag or model_name(model),
        "tokenizer_fingerprint": "none",
        "vocab_size": VOCAB,
        "block_size": BLOCK,
        "pad_id": 0,
        "splits": {"train": {"blocks": n_train}, "val": {"blocks": n_val}},
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), str(tiny_dir))


def config(tiny_dir, data_dir, save_dir, **kw) -> TrainConfig:
    base = dict(
        data=str(data_dir), model=str(tiny_dir), save_dir=str(save_dir), batch_size=4, max_steps=4, eval_every=2,
        save_every=2, log_every=1, warmup_steps=1, lora_r=4, eval_batches=2, device="cpu", chunk_tokens=40,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def make_heads(kind: str, lm_head: str = "shared", seed: int = 0, **cfg) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadsConfig(num_heads=3, hidden_size=64, vocab_size=VOCAB, kind=kind, lm_head=lm_head, **cfg))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return heads


@pytest.mark.parametrize("kind", ["medusa", "sequential"])
@pytest.mark.parametrize("soft", [False, True])
def test_label_offsets(kind, soft):
    model = tiny_llama(seed=1)
    heads = make_heads(kind)
    objective = MedusaObjective(model, heads, lambda_decay=0.5, soft_targets=soft, chunk_tokens=7)
    x = torch.randint(0, VOCAB, (2, 12))
    mask = (torch.rand(2, 12) > 0.3).float()
    out = objective(x, mask, metrics=True)
    with torch.no_grad():
        h = final_hidden(model, x)  # (B, T, D)
        emb = model.get_input_embeddings()(x)  # (B, T, D)
        expected_total = 0.0
        for k in range(3):
            n = 12 - k - 2
            # head k at t reads e(x_{t+k+1}) (sequential) and predicts x_{t+k+2}
            path = torch.stack([F.pad(emb[:, j + 1 :], (0, 0, 0, j + 1)) for j in range(3)])
            state = heads.chain_states(h, path if kind == "sequential" else None)[k][:, :n]
            logits = heads.project(k, state, model.lm_head)  # (B, n, V)
            w = mask[:, k + 2 :]
            if soft:  # the teacher's next-token distribution at t+k+1 also predicts x_{t+k+2}
                t_logp = F.log_softmax(model.lm_head(h[:, k + 1 : k + 1 + n]), -1)
                per = (t_logp.exp() * (t_logp - F.log_softmax(logits, -1))).sum(-1)
            else:
                per = F.cross_entropy(logits.transpose(1, 2), x[:, k + 2 :], reduction="none")
            loss_k = (per * w).sum() / w.sum()
            torch.testing.assert_close(out["head_loss"][k], loss_k)
            top1 = ((logits.argmax(-1) == x[:, k + 2 :]).float() * w).sum()
            torch.testing.assert_close(out["head_correct"][k, 0], top1)
            expected_total += 0.5**k * loss_k
    torch.testing.assert_close(out["loss"], expected_total)


def test_medusa1_leaves_backbone_bitwise_and_reduces_loss(tiny_dir, data_dir, tmp_path):
    reference = {k: v.clone() for k, v in tiny_llama(seed=0).state_dict().items()}
    seen = {}

    def check(step, objective):
        seen["state"] = objective.model.state_dict()

    cfg = config(
        tiny_dir, data_dir, tmp_path / "run", max_steps=24, eval_every=12, save_every=24, lr=2e-3, head_kind="medusa"
    )
    result = train(cfg, on_step=check)
    for name, value in reference.items():
        assert torch.equal(seen["state"][name], value), name
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result.steps == 24 and result.best_val_loss == min(e["val_loss"] for e in evals)
    best = tmp_path / "run" / "best"
    for name in ("medusa_heads.safetensors", "config.json", "train_config.json", "log.jsonl", "curves.png"):
        assert (best / name).is_file(), name
    assert not (best / "adapter_config.json").exists()  # stage 2 never ran
    loaded = MedusaHeads.load(best)
    assert loaded.config.base_model == model_name(str(tiny_dir)) and loaded.config.kind == "medusa"


def test_qlora_trains_exactly_lora_and_heads(tiny_dir, data_dir, tmp_path):
    from safetensors.torch import load_file

    names = {}

    def record(step, objective):
        names["trainable"] = {n for n, p in objective.named_parameters() if p.requires_grad}
        names["heads"] = set(objective.heads.state_dict())

    cfg = config(tiny_dir, data_dir, tmp_path / "q", stage="medusa2", qlora=True, max_steps=2, lm_head="own")
    train(cfg, on_step=record)
    trainable = names["trainable"]
    lora = {n for n in trainable if n.startswith("model.")}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert trainable - lora == {f"heads.{n}" for n in names["heads"]}
    assert len(lora) == 2 * 7 * 2  # A and B on the 7 linear projections of each of the 2 layers
    last = tmp_path / "q" / "last"
    assert set(load_file(last / "medusa_heads.safetensors")) == names["heads"]
    saved_lora = set(load_file(last / "adapter_model.safetensors"))
    assert {n.replace(".default", "").removeprefix("model.") for n in lora} == saved_lora
    assert (tmp_path / "q" / "best" / "adapter_config.json").is_file()


def test_resume_matches_uninterrupted_run(tiny_dir, data_dir, tmp_path):
    kw = dict(stage="both", medusa1_steps=2, max_steps=6, save_every=2, eval_every=3, lora_dropout=0.1, log_every=1)
    states = {}

    def keep(name):
        def hook(step, objective):
            states[name] = {k: v.detach().clone() for k, v in objective.named_parameters() if v.requires_grad}

        return hook

    train(config(tiny_dir, data_dir, tmp_path / "a", **kw), on_step=keep("a"))

    def interrupt(step, objective):
        if step == 5:  # after the checkpoint at 4: step 5 is lost and must be redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_dir, data_dir, tmp_path / "b", **kw), on_step=interrupt)
    with pytest.raises(MedusaError, match="--resume"):
        train(config(tiny_dir, data_dir, tmp_path / "b", **kw))
    train(config(tiny_dir, data_dir, tmp_path / "b", resume=True, **kw), on_step=keep("b"))
    assert states["a"].keys() == states["b"].keys() and any("lora_B" in k for k in states["a"])
    for name, value in states["a"].items():
        assert torch.equal(value, states["b"][name]), name

    def steps(run):
        events = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        return [(e["event"], e["step"], e.get("loss", e.get("val_loss"))) for e in events if "step" in e]

    assert steps("a") == steps("b")
    events = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    times = [e["time"] for e in events if e["event"] == "train"]
    assert times == sorted(times) and events[-1]["seconds"] >= times[-1]  # the clock spans both parts of the run


def test_teacher_pass_runs_with_adapters_disabled():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=3)
    reference = tiny_llama(seed=3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a non-zero adapter
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = final_hidden(reference, x)
        with teacher_context(peft_model):
            teacher = final_hidden(peft_model, x)
        student = final_hidden(peft_model, x)
    torch.testing.assert_close(teacher, expected, rtol=0, atol=1e-6)
    assert (student - expected).abs().max() > 1e-2
    objective = MedusaObjective(peft_model, make_heads("medusa"))
    out = objective(x, torch.ones(2, 10), joint=True)
    assert out["lm_kl"] > 0  # student differs from the teacher


def test_dataset_mismatch_and_missing(tiny_dir, tmp_path):
    other = write_dataset(tmp_path / "other", str(tiny_dir), model_tag="someone/else")
    with pytest.raises(MedusaError, match="tokenized for 'someone/else'"):
        train(config(tiny_dir, other, tmp_path / "r"))
    with pytest.raises(MedusaError, match="not a prepared dataset"):
        train(config(tiny_dir, tmp_path / "missing", tmp_path / "r"))


def _cli(argv, capsys):
    from medusa_llama import cli
    from medusa_llama.cli import train as commands_train

    parser = argparse.ArgumentParser(prog="medusa-llama")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands_train.register(parser.add_subparsers(dest="command", required=True))
    code = cli.run(argv, parser=parser)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/nonexistent/data"], "not a prepared dataset"),
        (["train", "--lambda-decay", "2"], "--lambda-decay"),
        (["train", "--stage", "medusa1", "--qlora"], "--qlora"),
        (["prepare", "--block-size", "4"], "--block-size"),
        (["prepare", "--dataset", "/nonexistent.jsonl"], "neither"),
        (["prepare", "--dataset", "wikitext", "--out", "/tmp/medusa-wikitext-test"], "wikitext"),
    ],
)
def test_cli_bad_input_exit_2_one_line(argv, message, capsys):
    code, err = _cli(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]


def test_train_kd_offsets_mapping():
    sys.path.insert(0, str(REPO))
    import train_kd

    args = train_kd.build_parser().parse_args(["--offsets", "1", "2", "3", "--student_name", "m", "--batch_size", "2"])
    from medusa_llama.cli.train import train_config

    cfg = train_config(args, stage="both")
    assert (cfg.num_heads, cfg.model, cfg.batch_size, cfg.stage) == (3, "m", 2, "both")
    with pytest.raises(ValueError, match="--offsets"):
        train_config(train_kd.build_parser().parse_args(["--offsets", "2", "3"]))


def test_qlora_memory_benchmark_tiny():
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "qlora_memory.py"), "--tiny"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["loss"] > 0 and result["trainable_lora"] > 0


def test_init_heads_start_from_trained_heads(tiny_dir, data_dir, tmp_path):
    start = MedusaHeads(HeadsConfig(num_heads=4, hidden_size=64, vocab_size=VOCAB, kind="sequential"))
    for p in start.parameters():
        torch.nn.init.normal_(p, std=0.2)
    start.save(tmp_path / "start")
    cfg = config(tiny_dir, data_dir, tmp_path / "run", max_steps=2, lr=1e-12, init_heads=str(tmp_path / "start"))
    train(cfg)  # a negligible learning rate: the heads come out as they went in (fresh ones would be zeros)
    got = MedusaHeads.load(tmp_path / "run" / "best").state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-8) for k, v in start.state_dict().items())
    wrong = config(tiny_dir, data_dir, tmp_path / "run2", head_kind="medusa", init_heads=str(tmp_path / "start"))
    with pytest.raises(MedusaError, match="--init-heads .* differ in kind"):
        train(wrong)


def test_shared_lm_head_heads_start_own_lm_head_heads(tiny_dir, data_dir, tmp_path):
    """``--lm-head own --init-heads SHARED``: the shared heads' tensors copied, each own LM head the base LM head."""
    start = random_heads("sequential", std=0.2)
    start.save(tmp_path / "shared")
    cfg = config(tiny_dir, data_dir, tmp_path / "own", max_steps=2, lr=1e-12, lm_head="own")
    train(dataclasses.replace(cfg, init_heads=str(tmp_path / "shared")))
    got = MedusaHeads.load(tmp_path / "own" / "best")
    assert got.config.lm_head == "own"
    state = got.state_dict()
    assert all(torch.allclose(state[k], v, atol=1e-8) for k, v in start.state_dict().items())
    base = tiny_llama(seed=0).lm_head.weight
    for k in range(4):
        torch.testing.assert_close(state[f"lm_heads.{k}.weight"], base, atol=1e-6, rtol=0)
    # the other way would drop trained LM heads: refused
    wrong = config(tiny_dir, data_dir, tmp_path / "shared_again", init_heads=str(tmp_path / "own" / "best"))
    with pytest.raises(MedusaError, match="--init-heads .* differ in lm_head"):
        train(wrong)


def test_head_lr_mult_zero_freezes_the_heads_and_trains_the_adapter(tiny_dir, data_dir, tmp_path):
    start = random_heads("sequential", std=0.2)
    start.save(tmp_path / "start")
    seen = {}

    def record(step, objective):
        seen["trainable"] = {n for n, p in objective.named_parameters() if p.requires_grad}
        seen["lora_B"] = {n: p.detach().clone() for n, p in objective.named_parameters() if "lora_B" in n}

    cfg = config(
        tiny_dir, data_dir, tmp_path / "run", stage="medusa2", head_lr_mult=0.0, lr=1e-2, max_steps=3,
        init_heads=str(tmp_path / "start"), lm_loss_weight=0.0,
    )  # fmt: skip
    train(cfg, on_step=record)
    assert seen["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in seen["trainable"])
    assert any(v.abs().sum() > 0 for v in seen["lora_B"].values())  # lora_B starts at zero: the heads' loss moved it
    for slot in ("best", "last"):
        got = MedusaHeads.load(tmp_path / "run" / slot).state_dict()
        assert all(torch.equal(got[k], v) for k, v in start.state_dict().items()), slot
    assert (tmp_path / "run" / "best" / "adapter_config.json").is_file()
    for stage in ("medusa1", "both"):
        with pytest.raises(ValueError, match="--head-lr-mult 0 .* needs --stage medusa2"):
            config(tiny_dir, data_dir, tmp_path / "x", stage=stage, head_lr_mult=0.0)
    with pytest.raises(ValueError, match="--head-lr-mult"):
        config(tiny_dir, data_dir, tmp_path / "x", stage="medusa2", head_lr_mult=-1.0)
    from medusa_llama.cli.train import add_train_args, train_config

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    assert train_config(parser.parse_args(["--stage", "medusa2", "--head-lr-mult", "0"])).head_lr_mult == 0
    assert "freezes" in parser.format_help()


def test_resume_never_runs_a_pickle(tiny_dir, data_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling this creates the marker file

    cfg = dict(max_steps=2, save_every=2, eval_every=2)
    train(config(tiny_dir, data_dir, tmp_path / "run", **cfg))
    last = tmp_path / "run" / "last"
    for name in ("trainer_state.safetensors", "trainer_state.json"):
        (last / name).unlink(missing_ok=True)
    torch.save({"step": Payload()}, last / "trainer_state.pt")  # the state file of older versions, planted
    with pytest.raises(MedusaError, match="never loaded") as info:
        train(config(tiny_dir, data_dir, tmp_path / "run", resume=True, **{**cfg, "max_steps": 4}))
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_best_is_from_the_final_stage(tiny_dir, data_dir, tmp_path, monkeypatch):
    from medusa_llama.train import loop

    real = loop.evaluate

    def stage2_costs_more(objective, blocks, cfg, joint, accelerator, device):
        metrics = real(objective, blocks, cfg, joint, accelerator, device)
        return {**metrics, "val_loss": metrics["val_loss"] + (10.0 if joint else 0.0)}  # like the added LM KL

    monkeypatch.setattr(loop, "evaluate", stage2_costs_more)
    cfg = config(tiny_dir, data_dir, tmp_path / "run", stage="both", medusa1_steps=2, max_steps=4, eval_every=1)
    result = train(cfg)
    evals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    stage2 = [e["val_loss"] for e in evals if e["event"] == "eval" and e["step"] > 2]
    assert result.best_step > 2 and result.best_val_loss == min(stage2)
    best = tmp_path / "run" / "best"
    assert (best / "adapter_config.json").is_file()
    assert MedusaHeads.load(best).config.num_heads == cfg.num_heads


@pytest.mark.parametrize("where", ["a_file", "a_file/run"])
def test_bad_save_dir_fails_before_loading_the_model(where, tiny_dir, data_dir, tmp_path, monkeypatch):
    import medusa_llama.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --save-dir was checked")

    monkeypatch.setattr(medusa_llama.loading, "load_model", no_load)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(MedusaError, match="--save-dir"):
        train(config(tiny_dir, data_dir, tmp_path / where))
    assert (tmp_path / "a_file").read_text() == "mine"


@pytest.mark.parametrize("slot", ["best", "last"])
def test_save_dir_holding_user_files_named_like_checkpoints_is_refused(slot, tiny_dir, data_dir, tmp_path, monkeypatch):
    import medusa_llama.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --save-dir was checked")

    monkeypatch.setattr(medusa_llama.loading, "load_model", no_load)
    (tmp_path / "run" / slot).mkdir(parents=True)
    (tmp_path / "run" / slot / "notes.txt").write_text("mine")
    with pytest.raises(MedusaError, match="not a checkpoint medusa-llama wrote"):
        train(config(tiny_dir, data_dir, tmp_path / "run"))
    assert (tmp_path / "run" / slot / "notes.txt").read_text() == "mine"


def test_prefix_heads_train_save_and_start_from_plain_heads(tiny_dir, data_dir, tmp_path):
    from medusa_llama.cli.train import add_train_args, train_config

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    assert train_config(parser.parse_args(["--prefix-attention"])).prefix_attention
    cfg = config(
        tiny_dir, data_dir, tmp_path / "run", max_steps=24, eval_every=12, save_every=24, lr=2e-3, prefix_attention=True
    )
    train(cfg)
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    trained = MedusaHeads.load(tmp_path / "run" / "best")
    c = trained.config
    assert c.prefix_attention and (c.prefix_num_heads, c.rope_theta) == (4, 10000.0)  # the backbone's
    assert trained.prefix.o_proj.weight.abs().sum() > 0 and trained.prefix.down_proj.weight.abs().sum() > 0  # learnt
    # plain heads start prefix heads: their weights copied, the new prefix layer the identity
    start = make_heads("sequential")
    start.save(tmp_path / "plain")
    cfg = config(tiny_dir, data_dir, tmp_path / "run2", num_heads=3, max_steps=2, lr=1e-12, prefix_attention=True)
    train(dataclasses.replace(cfg, init_heads=str(tmp_path / "plain")))
    got = MedusaHeads.load(tmp_path / "run2" / "best")
    assert all(torch.allclose(got.state_dict()[k], v, atol=1e-8) for k, v in start.state_dict().items())
    assert got.prefix.o_proj.weight.abs().max() < 1e-8 and got.prefix.down_proj.weight.abs().max() < 1e-8
    # but prefix heads do not start plain heads (their prefix layer would be dropped)
    trained.save(tmp_path / "with_prefix")
    wrong = config(tiny_dir, data_dir, tmp_path / "run3", init_heads=str(tmp_path / "with_prefix"))
    with pytest.raises(MedusaError, match="--init-heads .* differ in prefix_attention"):
        train(wrong)


@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_prefix_token_input_reads_the_next_token_and_learns(kind):
    """The objective feeds the prefix layer e(x_{t+1}); the block's last position, whose next token is unknown, reaches
    no loss (here it reads zeros instead of the objective's filler: the same losses); W_tok gets gradients."""
    model = tiny_llama(seed=1)
    heads = make_heads(kind, prefix_attention=True, prefix_num_heads=4, prefix_token_input=True)  # W_tok random too
    objective = MedusaObjective(model, heads, lambda_decay=0.5, chunk_tokens=7)
    x = torch.randint(0, VOCAB, (2, 12))
    mask = (torch.rand(2, 12) > 0.3).float()
    out = objective(x, mask)
    out["loss"].backward()
    assert heads.prefix.token.weight.grad is not None and heads.prefix.token.weight.grad.abs().sum() > 0
    with torch.no_grad():
        h = final_hidden(model, x)  # (B, T, D)
        emb = model.get_input_embeddings()(x)  # (B, T, D)
        next_emb = F.pad(emb[:, 1:], (0, 0, 0, 1))  # e(x_{t+1}), zeros at the last position
        path = torch.stack([F.pad(emb[:, j + 1 :], (0, 0, 0, j + 1)) for j in range(3)])
        states = heads.chain_states(heads.head_inputs(h, next_emb), path if kind == "sequential" else None)
        for k in range(3):
            n = 12 - k - 2
            logits = heads.project(k, states[k][:, :n], model.lm_head)  # (B, n, V)
            per = F.cross_entropy(logits.transpose(1, 2), x[:, k + 2 :], reduction="none")
            w = mask[:, k + 2 :]
            torch.testing.assert_close(out["head_loss"][k], (per * w).sum() / w.sum())
        with pytest.raises(ValueError, match="next_emb"):
            heads.head_inputs(h)  # the token input is not optional


def test_prefix_token_input_flag_trains_and_starts_from_prefix_heads(tiny_dir, data_dir, tmp_path):
    from medusa_llama.cli.train import add_train_args, train_config

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    args = parser.parse_args(["--prefix-attention", "--prefix-token-input"])
    assert train_config(args).prefix_token_input
    assert "EAGLE" in parser.format_help() and "lossless" in parser.format_help()
    with pytest.raises(ValueError, match="--prefix-token-input needs --prefix-attention"):
        train_config(parser.parse_args(["--prefix-token-input"]))
    # one run with the flag: the token projection (zero at start) learns and is saved, with the option in the config
    cfg = config(tiny_dir, data_dir, tmp_path / "run", max_steps=2, lr=2e-3, prefix_attention=True)
    train(dataclasses.replace(cfg, prefix_token_input=True))
    trained = MedusaHeads.load(tmp_path / "run" / "best")
    assert trained.config.prefix_token_input and trained.prefix.token.weight.abs().sum() > 0
    # prefix heads without the token input start heads with it: their weights copied, the new W_tok stays zero
    start = MedusaHeads(dataclasses.replace(trained.config, prefix_token_input=False))
    for p in start.parameters():
        torch.nn.init.normal_(p, std=0.2)
    start.save(tmp_path / "no_token")
    cfg = config(tiny_dir, data_dir, tmp_path / "run2", max_steps=2, lr=1e-12, prefix_attention=True)
    train(dataclasses.replace(cfg, prefix_token_input=True, init_heads=str(tmp_path / "no_token")))
    got = MedusaHeads.load(tmp_path / "run2" / "best")
    assert got.config.prefix_token_input
    assert all(torch.allclose(got.state_dict()[k], v, atol=1e-8) for k, v in start.state_dict().items())
    assert got.prefix.token.weight.abs().max() < 1e-8
    # plain heads start them too (the whole prefix layer is new); token heads do not start heads without it
    make_heads("sequential").save(tmp_path / "plain")
    cfg = config(tiny_dir, data_dir, tmp_path / "run3", num_heads=3, max_steps=2, lr=1e-12, prefix_attention=True)
    train(dataclasses.replace(cfg, prefix_token_input=True, init_heads=str(tmp_path / "plain")))
    assert MedusaHeads.load(tmp_path / "run3" / "best").prefix.token.weight.abs().max() < 1e-8
    wrong = config(
        tiny_dir, data_dir, tmp_path / "run4", prefix_attention=True, init_heads=str(tmp_path / "run" / "best")
    )
    with pytest.raises(MedusaError, match="--init-heads .* differ in prefix_token_input"):
        train(wrong)


def test_prefix_layer_takes_the_backbone_rope_base_from_either_config_spelling():
    from types import SimpleNamespace

    from medusa_llama.decode.heads import HeadsConfig
    from medusa_llama.train.build import backbone_rope_theta

    assert backbone_rope_theta(SimpleNamespace(rope_theta=5e5)) == 5e5  # transformers < 5
    assert backbone_rope_theta(SimpleNamespace(rope_parameters={"rope_theta": 1e5, "rope_type": "default"})) == 1e5
    assert backbone_rope_theta(SimpleNamespace()) == HeadsConfig.rope_theta
