"""Interchange formats: FasterDecoding/Medusa heads load and decode; export to vLLM and FasterDecoding writes exactly
the documented tensors; import -> export -> import changes nothing; sequential heads and pickles are refused.

The expected key lists below are written from the formats' own code, not from our exporter:
- FasterDecoding ``medusa/model/medusa_model.py``: ``medusa_head = ModuleList(Sequential(*[ResBlock(D)] * L,
  Linear(D, V, bias=False)) for each head)``, ``ResBlock.linear = Linear(D, D)``, saved as ``medusa_lm_head.pt``
  (``torch.save(medusa_head.state_dict())``) or ``medusa_lm_head.safetensors``; config ``medusa_num_heads``,
  ``medusa_num_layers``, ``base_model_name_or_path``.
- vLLM ``vllm/model_executor/models/medusa.py``: ``blocks = ModuleList(ResidualBlock(layers = ModuleList(
  Linear(D, D, bias=medusa_fc_bias) x num_hidden_layers)) x num_heads)``, ``lm_heads = ModuleList(
  ParallelLMHead(V, D) x num_heads)``; ``vllm/transformers_utils/configs/medusa.py`` for the config fields.
"""

import json
import pickle

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from medusa_llama.cli import run
from medusa_llama.decode import proposal
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
from medusa_llama.decode.heads_io import export_heads
from medusa_llama.decode.tree import build_tree
from medusa_llama.errors import MedusaError

D, V, K = 64, 96, 3  # the tiny model's hidden size and vocabulary; three heads
TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
GREEDY = GenerationConfig(max_new_tokens=24, stop_at_eos=False)


class RefResBlock(nn.Module):
    """FasterDecoding's ResBlock as its code defines it: ``x + SiLU(Linear(x))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def reference_heads(num_layers: int, seed: int = 1) -> nn.ModuleList:
    """FasterDecoding's ``medusa_head``, built the way its code builds it (one ResBlock repeated L times)."""
    torch.manual_seed(seed)
    heads = nn.ModuleList(
        nn.Sequential(*([RefResBlock(D)] * num_layers), nn.Linear(D, V, bias=False)) for _ in range(K)
    )
    for p in heads.parameters():
        nn.init.normal_(p, std=0.3)
    return heads.eval()


def write_reference_dir(directory, ref: nn.ModuleList, num_layers: int, weights: str):
    """A directory as FasterDecoding's trainer leaves it: MedusaConfig.save_pretrained + the heads' state dict."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model_name_or_path": "tiny",
        "medusa_num_heads": K,
        "medusa_num_layers": num_layers,
        "transformers_version": "4.34.0",
    }
    (directory / "config.json").write_text(json.dumps(config))
    state = ref.state_dict()
    if weights == "pt":
        torch.save(state, directory / "medusa_lm_head.pt")
    else:  # safetensors wants one storage per tensor (the repeated block shares them)
        save_file({k: v.clone() for k, v in state.items()}, directory / "medusa_lm_head.safetensors")
    return directory


def documented_keys(fmt: str, num_layers: int) -> dict[str, tuple[int, ...]]:
    if fmt == "vllm":
        keys = {f"lm_heads.{h}.weight": (V, D) for h in range(K)}
        for h in range(K):
            for layer in range(num_layers):
                keys[f"blocks.{h}.layers.{layer}.weight"] = (D, D)
                keys[f"blocks.{h}.layers.{layer}.bias"] = (D,)
        return keys
    keys = {f"{h}.{num_layers}.weight": (V, D) for h in range(K)}
    for h in range(K):
        for layer in range(num_layers):
            keys[f"{h}.{layer}.linear.weight"] = (D, D)
            keys[f"{h}.{layer}.linear.bias"] = (D,)
    return keys


def documented_logits(fmt: str, tensors: dict, h: int, num_layers: int, x: torch.Tensor) -> torch.Tensor:
    """Head ``h``'s logits computed from exported tensors the way the engine's code computes them."""
    for layer in range(num_layers):
        w, b = (
            (tensors[f"blocks.{h}.layers.{layer}.weight"], tensors[f"blocks.{h}.layers.{layer}.bias"])
            if fmt == "vllm"
            else (tensors[f"{h}.{layer}.linear.weight"], tensors[f"{h}.{layer}.linear.bias"])
        )
        x = x + nn.functional.silu(x @ w.T + b)
    lm = tensors[f"lm_heads.{h}.weight"] if fmt == "vllm" else tensors[f"{h}.{num_layers}.weight"]
    return x @ lm.T


def head_logits(heads: MedusaHeads, x: torch.Tensor, lm_head) -> list[torch.Tensor]:
    return [heads.project(k, s, lm_head) for k, s in enumerate(heads.chain_states(x))]


def read_dir(directory) -> tuple[dict, dict]:
    files = sorted(directory.glob("*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads((directory / "config.json").read_text()), tensors


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, "fast")


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, V, (11,), generator=torch.Generator().manual_seed(5)).tolist()


def decode(backbone, heads, prompt):
    out = MedusaDecoder(backbone, heads, TREE).generate(prompt, GREEDY)
    return out.tokens, out.steps


def proposals(backbone, heads, prompt) -> list[list[int]]:
    """The candidate trees the heads propose from a few real backbone states."""
    tree = build_tree(TREE, heads.num_heads)
    hidden = backbone.prefill(torch.tensor(prompt))  # (N, D)
    root = torch.tensor(7)
    return [proposal.propose(heads, h, root, tree, backbone.embed, backbone.lm_head).tolist() for h in hidden[-3:]]


@pytest.mark.parametrize("num_layers,weights", [(2, "pt"), (1, "safetensors")])
def test_faster_decoding_heads_load_and_decode(tmp_path, backbone, prompt, num_layers, weights, one_thread):
    ref = reference_heads(num_layers)
    heads = MedusaHeads.load(write_reference_dir(tmp_path / "fd", ref, num_layers, weights))
    c = heads.config
    assert (c.kind, c.lm_head, c.num_heads, c.num_layers, c.hidden_size, c.vocab_size, c.base_model) == (
        "medusa", "own", K, num_layers, D, V, "tiny",
    )  # fmt: skip
    x = torch.randn(5, D)
    with torch.no_grad():  # our ResBlock computes exactly the reference's x + SiLU(Linear(x))
        for k, logits in enumerate(head_logits(heads, x, None)):
            torch.testing.assert_close(logits, ref[k](x), rtol=0, atol=0)
    tokens, _ = decode(backbone, heads, prompt)
    assert tokens == VanillaDecoder(backbone).generate(prompt, GREEDY).tokens


@pytest.mark.parametrize("lm_head", ["own", "shared"])
def test_round_trip_keeps_tensors_and_decoding(tmp_path, backbone, prompt, lm_head, one_thread):
    if lm_head == "own":
        start = MedusaHeads.load(write_reference_dir(tmp_path / "fd", reference_heads(2), 2, "pt"))
    else:  # shared heads export with a copy of the base LM head per head
        start = random_heads("medusa", num_heads=K, num_layers=2, lm_head="shared")
    base_w = backbone.lm_head.weight
    export_heads(start, tmp_path / "vllm", "vllm", base_w)
    via_vllm = MedusaHeads.load(tmp_path / "vllm")
    export_heads(via_vllm, tmp_path / "medusa", "medusa")
    via_medusa = MedusaHeads.load(tmp_path / "medusa")
    export_heads(via_medusa, tmp_path / "vllm2", "vllm")
    again = MedusaHeads.load(tmp_path / "vllm2")

    ref = via_vllm.state_dict()
    for heads in (via_medusa, again):
        got = heads.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        assert heads.config == via_vllm.config
    if lm_head == "own":
        assert start.state_dict().keys() == ref.keys() and all(torch.equal(start.state_dict()[k], ref[k]) for k in ref)
    else:
        assert all(torch.equal(ref[f"lm_heads.{h}.weight"], base_w) for h in range(K))
    assert via_vllm.config.base_model == start.config.base_model

    want = proposals(backbone, start, prompt)
    assert all(proposals(backbone, heads, prompt) == want for heads in (via_vllm, via_medusa, again))
    want_tokens, want_steps = decode(backbone, start, prompt)
    assert decode(backbone, again, prompt) == (want_tokens, want_steps)
    assert want_tokens == VanillaDecoder(backbone).generate(prompt, GREEDY).tokens


@pytest.mark.parametrize("fmt", ["vllm", "medusa"])
def test_exported_files_are_the_documented_ones(tmp_path, fmt):
    heads = random_heads("medusa", num_heads=K, num_layers=2, lm_head="own")
    export_heads(heads, tmp_path / "out", fmt)
    config, tensors = read_dir(tmp_path / "out")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == documented_keys(fmt, 2)
    if fmt == "vllm":
        assert (config["model_type"], config["num_heads"], config["num_hidden_layers"]) == ("medusa", K, 2)
        assert (config["hidden_size"], config["vocab_size"], config["medusa_fc_bias"]) == (D, V, True)
        assert config.get("truncated_vocab_size") in (None, V)
        # vLLM's MedusaConfig.from_pretrained renames any key holding "num" and "heads"/"layers": only these two
        assert [k for k in config if "num" in k] == ["num_heads", "num_hidden_layers"]
    else:
        assert (tmp_path / "out" / "medusa_lm_head.safetensors").is_file()
        assert (config["medusa_num_heads"], config["medusa_num_layers"]) == (K, 2)
        assert config["base_model_name_or_path"] == "tiny"
    x = torch.randn(4, D)
    with torch.no_grad():
        for k, logits in enumerate(head_logits(heads, x, None)):
            torch.testing.assert_close(documented_logits(fmt, tensors, k, 2, x), logits)


def test_vllm_heads_without_fc_bias_load_as_vllm_runs_them(tmp_path):
    heads = random_heads("medusa", num_heads=K, num_layers=1, lm_head="own")
    export_heads(heads, tmp_path / "out", "vllm")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps({**config, "medusa_fc_bias": False}))
    loaded = MedusaHeads.load(tmp_path / "out")  # vLLM builds bias-free blocks and drops the file's biases
    assert all(torch.equal(block[0].linear.bias, torch.zeros(D)) for block in loaded.blocks)
    assert torch.equal(loaded.blocks[1][0].linear.weight, heads.blocks[1][0].linear.weight)


@pytest.mark.parametrize("fmt", ["vllm", "medusa"])
def test_sequential_heads_are_refused(tmp_path, fmt, capsys):
    heads = random_heads("sequential", num_heads=K)
    with pytest.raises(MedusaError, match="sequential heads cannot be exported to the .* format: .*previous token"):
        export_heads(heads, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()
    heads.save(tmp_path / "seq")
    assert run(["export", "--heads", str(tmp_path / "seq"), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sequential heads cannot be exported") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_export_never_writes_into_a_used_directory(tmp_path, capsys):
    heads = random_heads("medusa", num_heads=K, lm_head="own")
    heads.save(tmp_path / "heads")
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    argv = ["export", "--heads", str(tmp_path / "missing"), "--format", "vllm", "--out", str(used)]
    assert run(argv) == 2  # --out is checked first, before the heads are even read
    assert "--out" in capsys.readouterr().err and sorted(p.name for p in used.iterdir()) == ["notes.txt"]
    assert (used / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["export", "--heads", str(tmp_path / "heads"), "--format", "medusa", "--out", str(empty)]) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "medusa_lm_head.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "heads", "used"]  # no temporary left behind


class Payload:
    """Unpickling this runs ``open(marker, "w")``: proof that something was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["faster-decoding", "ours"])
def test_a_malicious_pickle_is_never_executed(tmp_path, layout):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live))).close()  # the payload is real: plain unpickling runs it
    assert live.exists()

    marker = tmp_path / "pwned"
    state = {"0.0.linear.weight": torch.zeros(D, D), "0.1.weight": Payload(marker)}
    if layout == "faster-decoding":
        write_reference_dir(tmp_path / "h", reference_heads(1), 1, "pt")
        target = tmp_path / "h"
        torch.save(state, target / "medusa_lm_head.pt")
    else:
        random_heads("medusa", num_heads=K).save(tmp_path / "h")
        target = tmp_path / "h" / "heads.pt"
        torch.save(state, target)
    with pytest.raises(MedusaError, match="holds more than tensors; it is not loaded") as err:
        MedusaHeads.load(target)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_cli_exports_shared_heads_with_a_copy_of_the_base_lm_head(tmp_path, capsys):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    config = HeadsConfig(num_heads=K, num_layers=1, hidden_size=D, vocab_size=V, kind="medusa", lm_head="shared")
    MedusaHeads(config).save(tmp_path / "heads")  # no base model recorded: --model names it
    argv = ["export", "--heads", str(tmp_path / "heads"), "--format", "medusa", "--out", str(tmp_path / "fd")]
    assert run([*argv, "--model", str(tmp_path / "base")]) == 0
    assert "wrote medusa heads" in capsys.readouterr().out
    _, tensors = read_dir(tmp_path / "fd")
    assert all(torch.equal(tensors[f"{h}.1.weight"], base.lm_head.weight) for h in range(K))
    assert MedusaHeads.load(tmp_path / "fd").config.lm_head == "own"
