"""The benchmark's figures are consistent with the runs they summarise; report files; CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.eval.bench import Run, aggregate, bench_methods, decoder_method, hf_method, run_stats, summarize
from medusa_llama.eval.report import markdown, write_report

MAX_NEW = 40


@pytest.fixture(scope="module")
def tiny_report():
    """Vanilla, Medusa (tree16) and HF generate on a tiny random Llama, 3 prompts: the report and the raw runs."""
    from medusa_llama.decode.backbone import make_backbone
    from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
    from medusa_llama.decode.tree import build_tree, builtin_tree

    backbone = make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, "fast")
    heads = random_heads(std=0.02)  # close to the identity: they accept often on a tiny model's repetitive output
    gen = GenerationConfig(max_new_tokens=MAX_NEW)
    vanilla, medusa = VanillaDecoder(backbone), MedusaDecoder(backbone, heads, build_tree(builtin_tree("tree16"), 4))
    raw: dict[str, list] = {"vanilla": [], "medusa": []}

    def recording(name, dec):
        method = decoder_method(dec, gen)

        def run(ids):
            raw[name].append(dec.generate(ids, gen))
            return method(ids)

        return run

    methods = {
        "vanilla": recording("vanilla", vanilla),
        "medusa": recording("medusa", medusa),
        "hf_generate": hf_method(backbone.hf_model, MAX_NEW, backbone.eos_token_ids),
    }
    g = torch.Generator().manual_seed(0)
    prompts = [(f"p{i}", torch.randint(0, 96, (6 + i,), generator=g).tolist()) for i in range(3)]
    warm = {"vanilla": decoder_method(vanilla, GenerationConfig(max_new_tokens=4))}
    return bench_methods(methods, prompts, warmup_methods=warm, progress=False), raw


def test_report_figures_are_consistent(tiny_report):
    report, raw = tiny_report
    assert len(report["prompts"]) == 3
    med = report["methods"]["medusa"]
    # tokens / steps = mean accepted tokens (the prefill's token is not a step); vanilla accepts exactly 1
    assert med["mean_accepted_tokens"] == pytest.approx((med["new_tokens"] - 3) / med["steps"])
    assert report["mean_accepted_tokens"] == med["mean_accepted_tokens"] > 1.0
    assert report["methods"]["vanilla"]["mean_accepted_tokens"] == 1.0
    assert report["methods"]["hf_generate"]["mean_accepted_tokens"] is None  # HF does not say
    depth = report["acceptance_by_depth"]
    assert all(a >= b for a, b in zip(depth, depth[1:], strict=False)) and 0 < depth[0] <= 1
    # every step emits 1 + (depth reached) tokens, except a step cut short by the token budget
    assert 1 + sum(depth) >= med["mean_accepted_tokens"] - 1e-9
    assert med["tokens_per_s"] == pytest.approx(med["new_tokens"] / med["wall_s"])
    assert report["medusa_tokens_per_s"] == med["tokens_per_s"] and report["medusa"] == med
    assert report["baseline_tokens_per_s"] == report["methods"]["vanilla"]["tokens_per_s"]
    assert report["speedup"] == pytest.approx(med["tokens_per_s"] / report["methods"]["vanilla"]["tokens_per_s"])
    assert set(report["speedups"]) == {"vanilla", "hf_generate"}
    for p in report["prompts"]:
        m = p["methods"]["medusa"]
        assert m["new_tokens"] == MAX_NEW
        assert m["mean_accepted_tokens"] == pytest.approx((m["new_tokens"] - 1) / m["steps"])
        assert m["latency_p50_ms"] <= m["latency_p90_ms"]
        assert p["speedup"] == pytest.approx(m["tokens_per_s"] / p["methods"]["vanilla"]["tokens_per_s"])


def test_identical_flag_is_checked_against_the_outputs(tiny_report):
    report, raw = tiny_report
    # fp32 greedy: Medusa is lossless on the tiny model, and so is HF generate
    for p, v, m in zip(report["prompts"], raw["vanilla"], raw["medusa"], strict=True):
        assert p["identical"] == (v.tokens == m.tokens) is True
    assert report["identical"] and report["identical_prompts"] == 3
    assert report["hf_identical_to_vanilla"]
    # a run that differs is reported as not identical
    runs = {name: [_run([1, 2, 3], steps=2)] for name in ("vanilla", "medusa")}
    runs["medusa"][0] = _run([1, 2, 4], steps=1)
    bad = summarize(runs, ["x"], [4])
    assert not bad["identical"] and bad["identical_prompts"] == 0 and not bad["prompts"][0]["identical"]


def _run(tokens, steps=None, times=None, prefill=0.1, total=None, per_depth=None) -> Run:
    times = times or [prefill + 0.1 * i for i in range(len(tokens))]
    return Run(
        tokens=tokens, token_times=times, prefill_s=prefill, total_s=total or times[-1], steps=steps,
        mean_accepted=(len(tokens) - 1) / steps if steps else None, accepted_per_depth=per_depth,
    )  # fmt: skip


def test_aggregate_pools_by_tokens_and_steps():
    a = _run([1] * 5, steps=2, times=[0.1, 0.2, 0.2, 0.3, 0.3], per_depth=[2, 0])  # 4 decode tokens in 2 steps
    b = _run([1] * 3, steps=2, times=[0.2, 0.4, 0.6], prefill=0.2, total=0.7, per_depth=[0, 0])
    agg = aggregate([a, b])
    assert agg["new_tokens"] == 8 and agg["steps"] == 4
    assert agg["mean_accepted_tokens"] == pytest.approx((4 + 2) / 4)
    assert agg["acceptance_by_depth"] == [0.5, 0.0]
    assert agg["tokens_per_s"] == pytest.approx(8 / (0.3 + 0.7))
    assert agg["decode_tokens_per_s"] == pytest.approx(6 / (0.2 + 0.5))
    assert agg["ttft_ms"] == pytest.approx(150.0)
    s = run_stats(a)
    assert s["latency_p50_ms"] == pytest.approx(50.0)  # gaps 0.1, 0, 0.1, 0
    assert s["acceptance_by_depth"] == [1.0, 0.0]
    hf = aggregate([_run([1, 2])])
    assert hf["steps"] is None and hf["mean_accepted_tokens"] is None and "acceptance_by_depth" not in hf


def test_report_files(tiny_report, tmp_path):
    report = dict(tiny_report[0], model="tiny", device="cpu", tree="tree16", tree_size=16, tree_depth=3)
    paths = write_report(report, tmp_path / "out" / "report.json")
    names = sorted(p.name for p in paths)
    assert names == ["report.json", "report.md", "report_acceptance.png", "report_tokens_per_s.png"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("prompts", "identical", "mean_accepted_tokens", "baseline_tokens_per_s", "medusa_tokens_per_s",
                "speedup", "device", "model", "tree_size", "methods"):  # fmt: skip
        assert key in saved, key
    md = markdown(saved)
    assert "| Medusa (ours) |" in md and "| HF generate |" in md and "identical to vanilla greedy: **yes**" in md


# -- CLI -------------------------------------------------------------------------------------------------------------


def run_cli(argv, capsys):
    from medusa_llama.cli import run

    code = run(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--limit", "0"], "--limit must be >= 1"),
        (["bench", "--max-new-tokens", "1"], "--max-new-tokens must be >= 2"),
        (["bench", "--baselines", "vllm"], "--baselines must be among"),
        (["bench", "--dtype", "float8"], "--dtype must be one of"),
        (["bench", "--acceptance", "typical"], "needs --temperature > 0"),
        (["bench", "--acceptance", "nope"], "argument --acceptance: invalid choice: 'nope'"),
        (["bench", "--prompts", "/nonexistent.jsonl"], "--prompts file not found"),
        (["heads-accuracy", "--topk", "11"], "--topk must be in 1..10"),
        (["tree", "--sizes", "1"], "--sizes must include a size >= 2"),
        (["tree", "--sizes", "4,x"], "--sizes must be comma-separated integers"),
        (["tree", "--probe-tokens", "0"], "--probe-tokens must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2 and message in err and err.startswith("error: ") and "\n" not in err


def test_cli_bad_files_fail_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    code, err = run_cli(["bench", "--prompts", str(bad)], capsys)
    assert code == 2 and f"{bad}:2" in err and "\n" not in err
    good = tmp_path / "g.jsonl"
    good.write_text('{"prompt": "ok"}\n')
    code, err = run_cli(["bench", "--prompts", str(good), "--tree", str(tmp_path / "none.json")], capsys)
    assert code == 2 and "neither a built-in tree" in err
    code, err = run_cli(["tree", "--accuracy", str(tmp_path / "none.json")], capsys)
    assert code == 2 and "--accuracy file not found" in err


@pytest.mark.integration
def test_bench_end_to_end_on_the_embedded_model(tmp_path, embedded_available):
    """`bench` on SmolLM2 with untrained (identity) heads: the whole pipeline, files and losslessness in fp32."""
    if not embedded_available:
        pytest.skip("the embedded model is not installed")
    from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
    from medusa_llama.eval.bench import BenchConfig, run_bench
    from medusa_llama.loading import EMBEDDED_ID

    MedusaHeads(HeadsConfig(hidden_size=576, vocab_size=49152, base_model=EMBEDDED_ID)).save(tmp_path / "heads")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?"}\n{"turns": ["Count from 1 to 20."]}\n')
    cfg = BenchConfig(heads=str(tmp_path / "heads"), device="cpu", prompts=str(prompts), max_new_tokens=16,
                      tree="tree16", baselines=("hf",), out=str(tmp_path / "r" / "report.json"))  # fmt: skip
    report = run_bench(cfg, progress=False)
    assert report["identical"] and report["dtype"] == "float32" and report["tree_size"] == 16
    assert set(report["methods"]) == {"vanilla", "medusa", "hf_generate", "hf_prompt_lookup"}
    assert report["hf_identical_to_vanilla"]
    assert len(report["files"]) == 4 and all((tmp_path / "r" / n).is_file() for n in ("report.json", "report.md"))
