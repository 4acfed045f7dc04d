"""The benchmark report carries a measured step breakdown (ms per step by phase) for vanilla and Medusa decoding."""

from __future__ import annotations

import json

import pytest
from conftest import random_heads, tiny_llama

from medusa_llama.decode.decoder import PHASES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny random Llama saved with a word-level tokenizer (``w1`` .. ``w95``, no EOS) and 4 random heads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tmp_path_factory.mktemp("models") / "tiny"
    tiny_llama(eos_token_id=None, bos_token_id=None).save_pretrained(model)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 96)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model)
    heads = tmp_path_factory.mktemp("heads")
    random_heads(std=0.02).save(heads)
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3 w4"}\n{"prompt": "w5 w6"}\n')
    return model, heads, prompts


def test_bench_report_carries_the_step_breakdown(tiny_dirs, tmp_path):
    from medusa_llama.eval.bench import PROFILE_STEPS, BenchConfig, run_bench

    model, heads, prompts = tiny_dirs
    out = tmp_path / "report.json"
    cfg = BenchConfig(
        model=str(model), heads=str(heads), tree="tree16", device="cpu", max_seq_len=128, prompts=str(prompts),
        max_new_tokens=12, warmup=False, out=str(out),
    )  # fmt: skip
    run_bench(cfg, progress=False)
    report = json.loads(out.read_text())
    breakdown = report["step_breakdown_ms"]
    assert set(breakdown) == {"vanilla", "medusa"} and report["step_breakdown_steps"] == PROFILE_STEPS
    for name, ms in breakdown.items():
        assert list(ms) == [*PHASES, "total"]
        assert ms["total"] == pytest.approx(sum(ms[p] for p in PHASES))
        assert all(ms[p] > 0 for p in PHASES if not (name == "vanilla" and p == "proposal")), (name, ms)
    assert breakdown["vanilla"]["proposal"] == 0.0  # no heads run in vanilla decoding
    md = out.with_suffix(".md").read_text()
    assert "| method | verify forward | LM head | acceptance | proposal | commit | total | ms per token |" in md
    row = next(line for line in md.splitlines() if line.startswith("| Medusa (ours) | ") and line.count("|") == 9)
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    assert all(c > 0 for c in cells)
    accepted = report["methods"]["medusa"]["mean_accepted_tokens"]
    assert cells[-1] == pytest.approx(breakdown["medusa"]["total"] / accepted, abs=0.01)  # ms per token
