"""The benchmark: vanilla vs Medusa decoding (and optionally HF ``generate``) on the same prompts and backbone.

Every method is a function ``prompt ids -> Run``; ``bench_methods`` runs them all on every prompt (after a warm-up)
and ``summarize`` turns the runs into the report: mean accepted tokens per step (bonus counted, vanilla = 1),
acceptance rate by tree depth, tokens/s, inter-token latency p50/p90, time to first token, wall clock, speedups,
and whether Medusa's output is token-identical to vanilla greedy decoding. ``bench_report.py`` writes it out.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import DecoderOptions, check_output_file, device_name

log = logging.getLogger(__name__)

BASELINES = ("hf",)
"""--baselines: "hf" adds HF ``generate`` greedy and HF prompt-lookup decoding."""
PROMPT_LOOKUP_TOKENS = 10
WARMUP_TOKENS = 16
PROFILE_STEPS = 8
"""Decode steps of the separate profiling pass that measures the step breakdown."""


@dataclass
class Run:
    """One generation by one method, in the decoders' terms (``decoding.GenerationResult``)."""

    tokens: list[int]
    """New token ids."""
    token_times: list[float]
    """Seconds from the start of the call at which each new token was available."""
    prefill_s: float
    """Time to first token."""
    total_s: float
    """Wall clock of the whole call."""
    steps: int | None = None
    """Decode steps after prefill (None where the method does not say: HF ``generate``)."""
    mean_accepted: float | None = None
    """Tokens per decode step, bonus token counted (vanilla = 1)."""
    accepted_per_depth: list[int] | None = None
    """Per tree depth d = 1..D: steps whose accepted path reached depth d."""

    @classmethod
    def from_result(cls, res) -> Run:
        return cls(
            tokens=[int(t) for t in res.tokens],
            token_times=[float(t) for t in res.token_times],
            prefill_s=float(res.prefill_s),
            total_s=float(res.total_s),
            steps=int(res.steps),
            mean_accepted=float(res.mean_accepted),
            accepted_per_depth=[int(a) for a in (res.accepted_per_depth or [])],
        )


Method = Callable[[list[int]], Run]


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work before reading a timer."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def step_breakdown(decoders: dict, prompt_ids: list[int], gen_config, steps: int = PROFILE_STEPS) -> dict:
    """Per decoder: milliseconds per decode step in each phase (``decoder.PHASES``: verify forward, LM head,
    acceptance, proposal, commit) and their ``total``, each the median of ``steps`` steps of a separate eager pass
    that synchronises the device after every phase (``Decoder.profile``). Measured, not estimated."""
    return {name: dec.profile(prompt_ids, gen_config, steps=steps) for name, dec in decoders.items()}


def decoder_method(decoder, gen_config) -> Method:
    """A ``VanillaDecoder`` / ``MedusaDecoder`` as a benchmark method."""
    return lambda ids: Run.from_result(decoder.generate(list(ids), gen_config))


def hf_method(hf_model, max_new_tokens: int, eos_token_ids, prompt_lookup: int | None = None) -> Method:
    """HF ``generate`` greedy (optionally with prompt-lookup decoding), timed by wall clock and a streamer."""
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        def __init__(self, t0: float):
            self.t0, self.times, self.seen_prompt = t0, [], False

        def put(self, value):  # called with the prompt first, then with each batch of new tokens (already on host)
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.times += [time.perf_counter() - self.t0] * int(value.numel())

        def end(self):
            pass

    device = hf_model.get_input_embeddings().weight.device
    eos = list(eos_token_ids) or None
    extra = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}

    @torch.inference_mode()
    def run(ids: list[int]) -> Run:
        inp = torch.tensor([ids], device=device)
        sync(device)
        t0 = time.perf_counter()
        streamer = TimingStreamer(t0)
        out = hf_model.generate(
            inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=eos[0] if eos else None, streamer=streamer, **extra,
        )  # fmt: skip
        sync(device)
        total = time.perf_counter() - t0
        tokens = out[0, len(ids) :].tolist()  # a batch of one stops at EOS: no padding
        times = (streamer.times + [total] * len(tokens))[: len(tokens)]
        return Run(tokens=tokens, token_times=times, prefill_s=times[0] if times else total, total_s=total)

    return run


# -- statistics ----------------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(torch.tensor(values, dtype=torch.float64).quantile(q / 100))


def _gaps(run: Run) -> list[float]:
    """Inter-token latencies: time between consecutive new tokens (0 for tokens accepted in the same step)."""
    t = run.token_times
    return [b - a for a, b in zip(t[:-1], t[1:], strict=True)]


def run_stats(run: Run) -> dict:
    """Figures of one generation."""
    n = len(run.tokens)
    decode_s = run.total_s - run.prefill_s
    gaps = _gaps(run)
    out = {
        "new_tokens": n,
        "wall_s": run.total_s,
        "ttft_ms": run.prefill_s * 1e3,
        "tokens_per_s": n / run.total_s if run.total_s > 0 else None,
        "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        "latency_p50_ms": _ms(_percentile(gaps, 50)),
        "latency_p90_ms": _ms(_percentile(gaps, 90)),
        "steps": run.steps,
        "mean_accepted_tokens": run.mean_accepted,
    }
    if run.accepted_per_depth is not None and run.steps:
        out["acceptance_by_depth"] = [a / run.steps for a in run.accepted_per_depth]
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def aggregate(runs: list[Run]) -> dict:
    """Figures of one method over all prompts: totals pooled (tokens/s = all tokens / all time), latencies pooled."""
    tokens = sum(len(r.tokens) for r in runs)
    wall = sum(r.total_s for r in runs)
    decode_s = sum(r.total_s - r.prefill_s for r in runs)
    gaps = [g for r in runs for g in _gaps(r)]
    out = {
        "prompts": len(runs),
        "new_tokens": tokens,
        "wall_s": wall,
        "ttft_ms": 1e3 * sum(r.prefill_s for r in runs) / len(runs),
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "decode_tokens_per_s": (tokens - len(runs)) / decode_s if decode_s > 0 else None,
        "latency_p50_ms": _ms(_percentile(gaps, 50)),
        "latency_p90_ms": _ms(_percentile(gaps, 90)),
        "steps": None,
        "mean_accepted_tokens": None,
    }
    if all(r.steps is not None for r in runs):
        steps = sum(r.steps for r in runs)
        out["steps"] = steps
        if steps and all(r.mean_accepted is not None for r in runs):
            out["mean_accepted_tokens"] = sum(r.mean_accepted * r.steps for r in runs) / steps  # step-weighted
        depths = [r.accepted_per_depth for r in runs if r.accepted_per_depth]
        if steps and depths:
            width = max(len(d) for d in depths)
            totals = [sum(d[i] for d in depths if i < len(d)) for i in range(width)]
            out["acceptance_by_depth"] = [t / steps for t in totals]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(runs: dict[str, list[Run]], prompt_ids: list[str], prompt_lens: list[int]) -> dict:
    """The report body from every method's runs (``runs[method][i]`` is prompt i). Methods "vanilla" and "medusa"
    are required; any others are baselines compared against Medusa.
    """
    methods = {name: aggregate(rs) for name, rs in runs.items()}
    med, van = runs["medusa"], runs["vanilla"]
    per_prompt = []
    for i, pid in enumerate(prompt_ids):
        stats = {name: run_stats(rs[i]) for name, rs in runs.items()}
        per_prompt.append(
            {
                "id": pid,
                "prompt_tokens": prompt_lens[i],
                "identical": med[i].tokens == van[i].tokens,
                "speedup": _ratio(stats["medusa"]["tokens_per_s"], stats["vanilla"]["tokens_per_s"]),
                "methods": stats,
            }
        )
    medusa_tps = methods["medusa"]["tokens_per_s"]
    speedups = {name: _ratio(medusa_tps, m["tokens_per_s"]) for name, m in methods.items() if name != "medusa"}
    report = {
        "identical": all(p["identical"] for p in per_prompt),
        "identical_prompts": sum(p["identical"] for p in per_prompt),
        "mean_accepted_tokens": methods["medusa"]["mean_accepted_tokens"],
        "acceptance_by_depth": methods["medusa"].get("acceptance_by_depth"),
        "baseline_tokens_per_s": methods["vanilla"]["tokens_per_s"],
        "medusa_tokens_per_s": medusa_tps,
        "speedup": speedups["vanilla"],
        "speedups": speedups,
        "methods": methods,
        **methods,  # the same per-method dicts at top level: report["medusa"]["latency_p50_ms"]
        "prompts": per_prompt,
    }
    if "hf_generate" in runs:
        report["hf_identical_to_vanilla"] = all(
            a.tokens == b.tokens for a, b in zip(runs["hf_generate"], van, strict=True)
        )
    return report


def bench_methods(
    methods: dict[str, Method], prompts: list[tuple[str, list[int]]],
    warmup_methods: dict[str, Method] | None = None, progress: bool = True,
) -> dict:  # fmt: skip
    """Run every method on every prompt (methods interleaved per prompt, so drift hits all alike) and summarize.

    ``warmup_methods`` (same keys, typically the methods with few new tokens) run once on the first prompt first.
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise MedusaError("no prompts to benchmark")
    for name, fn in (warmup_methods or {}).items():
        log.debug("warm-up: %s", name)
        fn(prompts[0][1])
    runs: dict[str, list[Run]] = {name: [] for name in methods}
    bar = tqdm(prompts, desc="bench", unit="prompt", disable=not progress)
    for _, ids in bar:
        for name, fn in methods.items():
            runs[name].append(fn(ids))
        tps = {k: sum(len(r.tokens) for r in v) / sum(r.total_s for r in v) for k, v in runs.items()}
        if "medusa" in tps and "vanilla" in tps:
            bar.set_postfix(speedup=f"{tps['medusa'] / tps['vanilla']:.2f}x", medusa=f"{tps['medusa']:.1f} tok/s")
    return summarize(runs, [p[0] for p in prompts], [len(p[1]) for p in prompts])


# -- the `bench` command -------------------------------------------------------------------------------------------


@dataclass
class BenchConfig(DecoderOptions):
    """``bench``: the decoder options (``--tree`` may also be ``auto``: run the tree optimizer here first), then:"""

    prompts: str | None = None
    """JSONL prompt file ("prompt" or "turns" per line) (default: the built-in held-out ShareGPT prompts)."""
    limit: int | None = 10
    """Benchmark at most this many prompts."""
    max_new_tokens: int = 128
    """New tokens per prompt and method."""
    accuracy: str | None = None
    """heads_accuracy.json, for --tree auto and the expected accepted length (default: measure it / the tree file's)."""
    acceptance: str = "auto"
    """greedy (lossless), typical (not lossless), sampling (lossless), or auto: greedy at temperature 0, else
    sampling."""
    temperature: float = 0.0
    """0 = greedy decoding."""
    baselines: tuple[str, ...] = ()
    """Extra baselines, comma-separated: "hf" = HF generate greedy and HF prompt-lookup decoding."""
    warmup: bool = True
    """A short warm-up generation of each method before timing."""
    out: str = "report.json"
    """JSON report path; report.md and the PNG plots are written beside it."""
    extra: dict = field(default_factory=dict)
    """Not a flag: extra keys stored in the report."""

    def __post_init__(self):
        super().__post_init__()
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 2:
            raise ValueError(f"--max-new-tokens must be >= 2, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"--baselines must be among {BASELINES}, got {bad}")
        from medusa_llama.decode.decoder import GenerationConfig

        GenerationConfig(self.max_new_tokens, self.temperature, self.acceptance).acceptance_config()  # checks flags


def read_accuracy(cfg: BenchConfig) -> list[list[float]] | None:
    """Head accuracies for the expected accepted length: --accuracy, else the "accuracy" key of a --tree file (an
    optimizer tree). Read before any model loads."""
    from medusa_llama.eval.tree_opt import load_accuracy

    if cfg.accuracy:
        return load_accuracy(cfg.accuracy)
    if cfg.tree and Path(cfg.tree).is_file():
        try:
            saved = json.loads(Path(cfg.tree).read_text())
        except json.JSONDecodeError:
            return None  # the tree loader says what is wrong with the file
        if isinstance(saved, dict) and isinstance(saved.get("accuracy"), list):
            return saved["accuracy"]
    return None


def tree_info(tree, spec: str, accuracy: list[list[float]] | None) -> dict:
    """The tree's name and, when head accuracies are known, its expected accepted length (as ``tree_opt``)."""
    from medusa_llama.decode.tree import expected_accept_length
    from medusa_llama.eval.tree_opt import monotone_accuracy

    info: dict = {"tree": spec}
    if accuracy is not None:
        if len(accuracy) < tree.max_depth:
            raise MedusaError(f"--accuracy covers {len(accuracy)} heads but the tree {spec} is {tree.max_depth} deep")
        info["expected_accept_length"] = expected_accept_length(tree.paths, monotone_accuracy(accuracy))
    return info


def auto_tree(cfg: BenchConfig, pipe, accuracy, bench_prompts):
    """``--tree auto``: run the tree optimizer on this device. Head accuracy comes from --accuracy or is measured
    on built-in held-out prompts disjoint from the benchmark's; the latency probe uses the benchmark prompts.
    Returns ``(tree, info)``.
    """
    from medusa_llama.decode.tree import build_tree
    from medusa_llama.eval.head_accuracy import decoding_draft, measure_head_accuracy
    from medusa_llama.eval.prompts import chat_ids, load_prompts
    from medusa_llama.eval.tree_opt import TreeOptConfig, optimize_for_device

    backbone, heads = pipe.backbone, pipe.heads
    opt = TreeOptConfig(**{f.name: getattr(cfg, f.name) for f in fields(DecoderOptions)})
    draft = decoding_draft(pipe)  # the benchmarked decoder proposes from it: the accuracy is scored over it too
    if accuracy is None:
        skip = 0 if cfg.prompts else len(bench_prompts)
        acc_prompts = load_prompts(None, limit=opt.accuracy_prompts, skip=skip)
        ids = [chat_ids(backbone.tokenizer, p.text) for p in acc_prompts]
        accuracy = measure_head_accuracy(backbone, heads, ids, opt.accuracy_tokens, draft=draft)["accuracy"]
    probe = [chat_ids(backbone.tokenizer, p.text) for p in bench_prompts[: opt.probe_prompts]]
    choices, info = optimize_for_device(backbone, heads, accuracy, probe, opt)
    info["draft_vocab"] = 0 if draft is None else draft.size
    return build_tree(choices, heads.num_heads), {"tree": "auto", **info}


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """The `bench` command: load, decode every prompt with every method, write the report files."""
    import transformers

    from medusa_llama.decode.decoder import GenerationConfig
    from medusa_llama.eval.prompts import chat_ids, load_prompts
    from medusa_llama.eval.report import write_report
    from medusa_llama.pipeline import load_pipeline

    check_output_file(cfg.out, "--out")  # bad files fail before the model loads: the report's path ...
    check_output_file(Path(cfg.out).with_suffix(".md"), "--out")
    prompts = load_prompts(cfg.prompts, limit=cfg.limit)  # ... the prompts, the accuracies, heads and tree
    accuracy = read_accuracy(cfg)
    auto = cfg.tree == "auto"
    pipe = load_pipeline(replace(cfg, tree=None) if auto else cfg, need_heads=True)
    if auto:
        tree, info = auto_tree(cfg, pipe, accuracy, prompts)
        pipe = pipe.with_tree(tree)
    else:
        info = tree_info(pipe.tree, pipe.tree_spec, accuracy)
    backbone, tree = pipe.backbone, pipe.tree
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, acceptance=cfg.acceptance)
    short = GenerationConfig(max_new_tokens=WARMUP_TOKENS, temperature=cfg.temperature, acceptance=cfg.acceptance)
    vanilla, medusa = pipe.vanilla(), pipe.decoder
    methods = {"vanilla": decoder_method(vanilla, gen), "medusa": decoder_method(medusa, gen)}
    warm = {"vanilla": decoder_method(vanilla, short), "medusa": decoder_method(medusa, short)}
    if "hf" in cfg.baselines:
        eos = backbone.eos_token_ids
        methods["hf_generate"] = hf_method(backbone.hf_model, cfg.max_new_tokens, eos)
        methods["hf_prompt_lookup"] = hf_method(backbone.hf_model, cfg.max_new_tokens, eos, PROMPT_LOOKUP_TOKENS)
        warm["hf_generate"] = hf_method(backbone.hf_model, WARMUP_TOKENS, eos)
        warm["hf_prompt_lookup"] = hf_method(backbone.hf_model, WARMUP_TOKENS, eos, PROMPT_LOOKUP_TOKENS)
    encoded = [(p.id, chat_ids(backbone.tokenizer, p.text)) for p in prompts]
    for _, ids in encoded:
        backbone.check_room(len(ids), cfg.max_new_tokens + tree.size)
    report = bench_methods(methods, encoded, warmup_methods=warm if cfg.warmup else None, progress=progress)
    report["step_breakdown_ms"] = step_breakdown({"vanilla": vanilla, "medusa": medusa}, encoded[0][1], gen)
    report["step_breakdown_steps"] = PROFILE_STEPS
    expected = info.get("expected_accept_length")
    measured = report["mean_accepted_tokens"]
    report["expected_vs_measured"] = {
        "expected_accepted_tokens": expected,
        "measured_accepted_tokens": measured,
        "relative_error": (measured - expected) / expected if expected and measured else None,
    }
    report.update(
        device=device_name(backbone.device),
        model=backbone.name,
        heads=str(cfg.heads or "default"),
        adapter=str(pipe.adapter) if pipe.adapter else None,  # not None: lossless to the adapted model only
        backend=type(backbone).__name__,
        dtype=str(backbone.dtype).removeprefix("torch."),
        acceptance=gen.acceptance_config().rule,
        tree=info.pop("tree"),
        tree_size=tree.size,
        tree_depth=tree.max_depth,
        tree_info=info,
        max_new_tokens=cfg.max_new_tokens,
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        **cfg.extra,
    )
    report["files"] = [str(p) for p in write_report(report, cfg.out)]
    return report
