"""Flags derived from the config dataclasses: every default declared once, every flag explained, old names kept."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from medusa_llama.cli import build_parser
from medusa_llama.cli.options import config_from_args, field_docs
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.decode.tree import BUILTIN_TREE_NAMES, DEFAULT_TREE
from medusa_llama.eval.bench import BenchConfig
from medusa_llama.eval.head_accuracy import HeadAccuracyConfig
from medusa_llama.eval.tree_opt import TreeOptConfig
from medusa_llama.pipeline import DecoderOptions
from medusa_llama.train.loop import TrainConfig
from medusa_llama.train.prepare import PrepareConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the seed's scripts

COMMANDS = {
    "generate": ["hi"],
    "prepare": [],
    "train": [],
    "bench": [],
    "heads-accuracy": [],
    "tree": [],
}
CONFIGS = {
    "generate": [DecoderOptions, GenerationConfig],
    "prepare": [PrepareConfig],
    "train": [TrainConfig],
    "bench": [BenchConfig],
    "heads-accuracy": [HeadAccuracyConfig],
    "tree": [TreeOptConfig],
}
NOT_DECODING = {"bench": ("vanilla",), "heads-accuracy": ("tree", "vanilla"), "tree": ("tree", "vanilla")}
"""Decoder options that are no flags of these commands (bench always runs both decoders)."""


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def seed_parsers() -> dict[str, argparse.ArgumentParser]:
    import decode_tree
    import evaluate
    import preprocess_data
    import train_kd

    return {
        "decode_tree.py": decode_tree.parser(),
        "evaluate.py": evaluate.build_parser(),
        "preprocess_data.py": preprocess_data.build_parser(),
        "train_kd.py": train_kd.build_parser(),
    }


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    return {**subparsers(build_parser()), **seed_parsers()}


@pytest.mark.parametrize("name", [*COMMANDS, "decode_tree.py", "evaluate.py", "preprocess_data.py", "train_kd.py"])
def test_every_flag_is_explained(name, capsys):
    parser = all_parsers()[name]
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text


@pytest.mark.parametrize("command", COMMANDS)
def test_no_flags_means_the_dataclass_defaults(command):
    """Flags default to None: what a command gets without flags is exactly each dataclass's own defaults."""
    args = build_parser().parse_args([command, *COMMANDS[command]])
    for cls in CONFIGS[command]:
        assert config_from_args(cls, args) == cls()


@pytest.mark.parametrize("command", COMMANDS)
def test_each_field_is_a_flag_with_its_default_in_the_help(command):
    parser = subparsers(build_parser())[command]
    by_dest = {a.dest: a for a in parser._actions}
    for cls in CONFIGS[command]:
        for f in fields(cls):
            if f.name in ("extra",) or (cls is GenerationConfig and f.name not in by_dest):
                continue  # not flags: free-form report keys; the decoder's tuning knobs
            if f.name in NOT_DECODING.get(command, ()):
                assert f.name not in by_dest
                continue
            action = by_dest[f.name]
            assert field_docs(cls)[f.name], f"{cls.__name__}.{f.name} has no docstring"
            if f.default not in (None, (), True, False):
                assert f"(default: {f.default})" in action.help.replace("%%", "%"), (command, f.name, action.help)


def test_the_tree_help_names_every_built_in_tree():
    doc = field_docs(DecoderOptions)["tree"]
    assert all(name in doc for name in BUILTIN_TREE_NAMES) and f"else {DEFAULT_TREE}" in doc


def test_seed_spellings_and_switches():
    parse = build_parser().parse_args
    prep = config_from_args(PrepareConfig, parse(["prepare", "--dataset_name", "x.jsonl", "--block_size", "64"]))
    assert (prep.dataset, prep.block_size) == ("x.jsonl", 64)
    from medusa_llama.cli.train import train_config

    argv = ["train", "--student_name", "m", "--batch_size", "2", "--save_dir", "d", "--offsets", "1", "2", "3"]
    cfg = train_config(parse([*argv, "--no-bf16", "--qlora", "--stage", "both"]))
    assert (cfg.model, cfg.batch_size, cfg.save_dir, cfg.num_heads, cfg.bf16, cfg.qlora) == (
        "m",
        2,
        "d",
        3,
        False,
        True,
    )
    bench = config_from_args(BenchConfig, parse(["bench", "--no-warmup", "--baselines", "hf", "--tree", "auto"]))
    assert (bench.warmup, bench.baselines, bench.tree) == (False, ("hf",), "auto")
    tree = config_from_args(TreeOptConfig, parse(["tree", "--sizes", "1,4,16"]))
    assert tree.sizes == (1, 4, 16)
    seed = seed_parsers()["decode_tree.py"].parse_args(
        ["--base_model_id", "m", "--mtp_ckpt_path", "h.safetensors", "--adapter_dir", "a", "--prompt", "p"]
    )
    opts = config_from_args(DecoderOptions, seed)
    assert (opts.model, opts.heads, opts.adapter, seed.prompt) == ("m", "h.safetensors", "a", "p")
