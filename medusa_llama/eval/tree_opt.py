"""The hardware-aware tree optimizer: the tree that maximises expected tokens per second on this device.

A bigger tree accepts more tokens per step but costs more per step; how much more depends on the hardware
(a GPU verifies 64 tokens for about the price of one; a CPU pays roughly per token). So:

1. ``measure_latency_curve``: the real time of a whole decode step of ``MedusaDecoder`` (the heads' proposal, the
   verify forward, the LM head over the tree, acceptance and the KV commit) for trees of several sizes (size 1 is
   vanilla decoding), median over a few short generations on this device.
2. ``optimize_tree`` (pure): for every size n the best tree under the product model of per-depth, per-rank head
   accuracies is ``grow_tree(accuracy, n - 1)`` (Medusa, Sec. 2.3.3); its expected speed is
   ``expected_accept_length / latency(n)``, the latency interpolated between measured sizes. Pick the fastest,
   vanilla decoding (size 1, the empty tree ``[]``) included: where no tree pays, as on a slow CPU, none is used.
"""

from __future__ import annotations

import bisect
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from medusa_llama.decode.tree import build_tree, expected_accept_length, grow_tree, save_choices
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import DecoderOptions, check_output_file, device_name

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 4, 8, 16, 32, 64, 96, 128, 192, 256)
"""Tree sizes (tokens, root included) timed on a GPU, where a step costs nearly the same for 1 to 256 tokens."""
CPU_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""Tree sizes timed on a CPU, where every tree token costs time (and timing 256-token trees takes minutes)."""


MIN_ACCURACY = 1e-6
"""Floor for measured accuracies: a rank never seen right is not impossible (and ``grow_tree`` divides by it)."""


def monotone_accuracy(accuracy: list[list[float]]) -> list[list[float]]:
    """Each depth's per-rank accuracies made non-increasing in rank (isotonic regression, pool adjacent violators)
    and floored at ``MIN_ACCURACY``.

    The best-first growth assumes rank r+1 is never better than rank r; measured rows can break that by noise at
    high ranks with few hits. Pooling keeps each row's total (its top-k accuracy) unchanged.
    """
    out = []
    for row in accuracy:
        blocks: list[list[float]] = []  # [mean, count]
        for x in row:
            blocks.append([float(x), 1.0])
            while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
                (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
                blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
        out.append([max(m, MIN_ACCURACY) for m, c in blocks for _ in range(int(c))])
    return out


def interpolate_latency(curve: dict[int, float], n: int) -> float:
    """Seconds per step for a tree of ``n`` tokens (root included), piecewise linear between measured sizes.

    Outside the measured range the nearest end is used (no extrapolation).
    """
    if not curve:
        raise ValueError("the latency curve is empty")
    sizes = sorted(curve)
    if n <= sizes[0]:
        return curve[sizes[0]]
    if n >= sizes[-1]:
        return curve[sizes[-1]]
    i = bisect.bisect_left(sizes, n)
    lo, hi = sizes[i - 1], sizes[i]
    if hi == n:
        return curve[n]
    w = (n - lo) / (hi - lo)
    return curve[lo] * (1 - w) + curve[hi] * w


def tree_table(accuracy: list[list[float]], latency_curve: dict[int, float], sizes=None) -> list[dict]:
    """One row per tree size n (tokens, root included): expected accepted length, latency, expected tokens/s.

    ``sizes`` defaults to every n from 1 to the largest measured size. ``grow_tree`` adds nodes best-first, so the
    best tree of n - 1 nodes is a prefix of the best tree of more nodes: one growth serves every size.
    """
    accuracy = monotone_accuracy(accuracy)
    sizes = sorted(set(sizes if sizes is not None else range(1, max(latency_curve) + 1)))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"tree sizes must be >= 1, got {sizes}")
    grown = grow_tree(accuracy, sizes[-1] - 1)
    rows = []
    for n in sizes:
        if n - 1 > len(grown):
            break  # the heads cannot fill a tree this big (every rank of every depth is used)
        eal = expected_accept_length(grown[: n - 1], accuracy)
        latency = interpolate_latency(latency_curve, n)
        rows.append(
            {
                "size": n,
                "expected_accept_length": eal,
                "latency_ms": latency * 1e3,
                "expected_tokens_per_s": eal / latency,
            }
        )
    return rows


def optimize_tree(
    accuracy: list[list[float]], latency_curve: dict[int, float], sizes=None
) -> tuple[list[list[int]], list[dict]]:
    """Pure: the tree with the highest expected tokens/s, and the table it was chosen from.

    Returns ``(choices, table)``. When vanilla decoding (size 1) is expected to be fastest, ``choices`` is ``[]``,
    the root-only tree, which ``MedusaDecoder`` decodes as ``VanillaDecoder`` does.
    """
    accuracy = monotone_accuracy(accuracy)
    table = tree_table(accuracy, latency_curve, sizes)
    if not any(r["size"] >= 2 for r in table):
        raise ValueError("no tree size >= 2 to choose from: measure the latency of larger trees")
    best = max(table, key=lambda r: r["expected_tokens_per_s"])  # the first, smallest, of equals
    if best["size"] == 1:
        tree = max((r for r in table if r["size"] >= 2), key=lambda r: r["expected_tokens_per_s"])
        log.warning(
            "no tree pays on this device: vanilla decoding (%.1f tok/s expected) beats the best tree (%d tokens, "
            "%.1f tok/s expected), so the tree is the root alone",
            best["expected_tokens_per_s"], tree["size"], tree["expected_tokens_per_s"],
        )  # fmt: skip
    return grow_tree(accuracy, best["size"] - 1), table


def step_time(result) -> float:
    """Seconds per decode step of one generation (prefill excluded)."""
    if not result.steps:
        raise MedusaError("a latency probe generated no decode steps: raise --probe-tokens")
    return (result.total_s - result.prefill_s) / result.steps


def measure_latency_curve(
    backbone, heads, accuracy: list[list[float]], prompt_ids: list[list[int]], sizes=DEFAULT_SIZES,
    max_new_tokens: int = 32, progress: bool = True, compile: bool = False, draft_vocab: int | None = None,
) -> dict[int, float]:  # fmt: skip
    """Median seconds per decode step of the real decoders for trees of each size (1 = ``VanillaDecoder``).

    Each tree is ``grow_tree(accuracy, n - 1)``, the tree the optimizer would pick at that size, and the time is that
    of the whole step as generation runs it (wall clock of the decode loop / steps): the heads' proposal, the verify
    forward, the LM head over the tree, acceptance and the KV commit. Every decoder is warmed up (and on a GPU its
    step captured) first; then sizes are interleaved per prompt, so load drifting over time hits all sizes alike.
    ``draft_vocab``: the decoders' ``--draft-vocab`` (None: the heads' stored draft vocabulary, 0: none).
    """
    from tqdm.auto import tqdm

    from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder

    if not prompt_ids:
        raise MedusaError("the latency probe needs at least one prompt")
    accuracy = monotone_accuracy(accuracy)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, acceptance="greedy")
    warm = GenerationConfig(max_new_tokens=min(8, max_new_tokens), temperature=0.0, acceptance="greedy")
    decoders = {}
    for n in sorted(set(sizes)):
        if n == 1:
            decoders[n] = VanillaDecoder(backbone, compile=compile)
        else:
            tree = build_tree(grow_tree(accuracy, n - 1), heads.num_heads)
            decoders[n] = MedusaDecoder(backbone, heads, tree, compile=compile, draft_vocab=draft_vocab)
        decoders[n].generate(prompt_ids[0], warm)
    times: dict[int, list[float]] = {n: [] for n in decoders}
    for ids in tqdm(prompt_ids, desc="verify latency", unit="prompt", disable=not progress):
        for n, dec in decoders.items():
            times[n].append(step_time(dec.generate(ids, gen)))
    curve = {n: statistics.median(t) for n, t in times.items()}
    log.debug("step latency by tree size (ms): %s", {n: round(t * 1e3, 2) for n, t in curve.items()})
    return curve


def profile_trees(
    backbone, heads, accuracy: list[list[float]], prompt_ids: list[int], sizes, steps: int = 8,
    draft_vocab: int | None = None,
) -> dict[int, dict[str, float]]:  # fmt: skip
    """Per tree size (tokens with the root; 1 = vanilla): milliseconds per step of each phase of the step
    (``decoder.PHASES``: verify forward, LM head, acceptance, proposal, commit), measured by ``profile`` (eager).
    ``draft_vocab`` as for ``measure_latency_curve``."""
    from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder

    accuracy = monotone_accuracy(accuracy)
    gen = GenerationConfig(temperature=0.0, acceptance="greedy")
    out = {}
    for n in sorted(set(sizes)):
        tree = grow_tree(accuracy, n - 1)  # n = 1: the root alone, vanilla decoding
        dec = MedusaDecoder(backbone, heads, tree, draft_vocab=draft_vocab)
        dec.profile(prompt_ids, gen, steps=2)  # warm-up
        out[n] = dec.profile(prompt_ids, gen, steps=steps)
    log.debug("step breakdown by tree size (ms): %s", out)
    return out


# -- the `tree` command --------------------------------------------------------------------------------------------


@dataclass
class TreeOptConfig(DecoderOptions):
    """``tree``: the decoder options (no tree: this command makes one), then:"""

    accuracy: str | None = None
    """A heads_accuracy.json from `heads-accuracy` (or a tree file holding "accuracy") (default: measure it first)."""
    sizes: tuple[int, ...] | None = None
    """Comma-separated tree sizes to time, in tokens with the root, 1 = vanilla (default: 1,4,8,...,256 on a GPU,
    1,2,4,...,64 on a CPU)."""
    prompts: str | None = None
    """JSONL prompt file for the measurements (default: the built-in held-out ShareGPT prompts)."""
    probe_prompts: int = 3
    """Generations per tree size for the latency curve."""
    probe_tokens: int = 32
    """New tokens per latency-probe generation."""
    accuracy_prompts: int = 24
    """Prompts for measuring head accuracy when --accuracy is not given."""
    accuracy_tokens: int = 128
    """Greedy continuation length per prompt for the accuracy measurement."""
    out: str = "medusa_choices.json"
    """Where to write the chosen tree (a medusa_choices JSON, usable as --tree FILE)."""
    extra: dict = field(default_factory=dict)
    """Not a flag: extra keys to store in the output file."""

    def __post_init__(self):
        super().__post_init__()
        if self.sizes is None:
            self.sizes = DEFAULT_SIZES if self.torch_device.type == "cuda" else CPU_SIZES
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise ValueError(f"--sizes must be positive tree sizes, got {list(self.sizes)}")
        if max(self.sizes) < 2:
            raise ValueError(f"--sizes must include a size >= 2 (a tree), got {list(self.sizes)}")
        for name in ("probe_prompts", "probe_tokens", "accuracy_prompts", "accuracy_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def load_accuracy(path: str | Path) -> list[list[float]]:
    """Per-depth, per-rank head accuracies from a ``heads-accuracy`` report or an optimizer tree file."""
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"--accuracy file not found: {path}")
    try:
        data = json.loads(path.read_text())
        acc = data["accuracy"] if isinstance(data, dict) else data
        acc = [[float(x) for x in row] for row in acc]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MedusaError(f"--accuracy file {path} holds no per-depth accuracy table ({exc})") from exc
    if not acc or not all(acc) or any(not 0.0 <= x <= 1.0 for row in acc for x in row):
        raise MedusaError(f"--accuracy file {path}: accuracies must be non-empty rows of probabilities")
    return acc


def check_accuracy_draft(path: str | Path, draft_size: int) -> None:
    """Warn when an --accuracy file records scoring over another draft vocabulary size than decoding uses (files
    written before the size was recorded say nothing: no warning)."""
    data = json.loads(Path(path).read_text())
    recorded = data.get("draft_vocab") if isinstance(data, dict) else None
    if recorded is not None and recorded != draft_size:
        log.warning(
            "--accuracy %s was scored with a draft vocabulary of %s tokens (0: none) but decoding uses %s: "
            "the expected acceptance will be off; measure it again with this --draft-vocab",
            path, recorded, draft_size,
        )  # fmt: skip


def optimize_for_device(backbone, heads, accuracy: list[list[float]], prompt_ids: list[list[int]], cfg: TreeOptConfig):
    """Measure the latency curve here, optimise, and return ``(choices, info)`` (info = the saved extra keys)."""
    accuracy = [row for row in accuracy[: heads.num_heads]]
    curve = measure_latency_curve(
        backbone, heads, accuracy, prompt_ids, cfg.sizes, cfg.probe_tokens, compile=getattr(cfg, "compile", False),
        draft_vocab=getattr(cfg, "draft_vocab", None),
    )  # fmt: skip
    choices, table = optimize_tree(accuracy, curve)
    best = next(r for r in table if r["size"] == len(choices) + 1)
    runner_up = max((r for r in table if r["size"] >= 2), key=lambda r: r["expected_tokens_per_s"])["size"]
    shown = sorted({1, best["size"], runner_up})  # vanilla, the choice, and the best real tree when vanilla won
    breakdown = profile_trees(
        backbone, heads, accuracy, prompt_ids[0], shown, draft_vocab=getattr(cfg, "draft_vocab", None)
    )
    info = {
        "tree_size": best["size"],
        "expected_accept_length": best["expected_accept_length"],
        "expected_tokens_per_s": best["expected_tokens_per_s"],
        "latency_curve_ms": {str(n): t * 1e3 for n, t in sorted(curve.items())},
        "measured_sizes": sorted(curve),
        "table": [r for r in table if r["size"] in curve or r["size"] == best["size"]],
        "step_breakdown_ms": {str(n): ms for n, ms in breakdown.items()},
        "accuracy": accuracy,
        "device": device_name(backbone.device),
        "model": backbone.name,
    }
    log.info(
        "best tree: %d tokens, expected %.2f tokens/step, %.1f tokens/s (vanilla measured %.1f tokens/s)",
        best["size"], best["expected_accept_length"], best["expected_tokens_per_s"],
        1.0 / curve[1] if 1 in curve else float("nan"),
    )  # fmt: skip
    return choices, info


def run_tree_opt(cfg: TreeOptConfig) -> dict:
    """The `tree` command: accuracy (given or measured), latency curve, optimised tree saved to ``cfg.out``.

    The accuracy is measured over the draft vocabulary that decoding with ``cfg.draft_vocab`` proposes from; the
    saved file records its size (``draft_vocab``, 0 for none)."""
    from medusa_llama.eval.head_accuracy import decoding_draft, measure_head_accuracy
    from medusa_llama.eval.prompts import chat_ids, load_prompts
    from medusa_llama.pipeline import load_pipeline

    check_output_file(cfg.out, "--out")
    accuracy = load_accuracy(cfg.accuracy) if cfg.accuracy else None
    probe = load_prompts(cfg.prompts, limit=cfg.probe_prompts)
    pipe = load_pipeline(cfg, need_heads=True)
    backbone, heads = pipe.backbone, pipe.heads
    draft = decoding_draft(pipe)
    draft_size = 0 if draft is None else draft.size
    if accuracy is None:
        acc_prompts = load_prompts(cfg.prompts, limit=cfg.accuracy_prompts)
        ids = [chat_ids(backbone.tokenizer, p.text) for p in acc_prompts]
        accuracy = measure_head_accuracy(backbone, heads, ids, cfg.accuracy_tokens, draft=draft)["accuracy"]
    else:
        check_accuracy_draft(cfg.accuracy, draft_size)
    if len(accuracy) < heads.num_heads:
        raise MedusaError(f"the accuracy table covers {len(accuracy)} heads but the heads have {heads.num_heads}")
    choices, info = optimize_for_device(
        backbone, heads, accuracy, [chat_ids(backbone.tokenizer, p.text) for p in probe], cfg
    )
    info["draft_vocab"] = draft_size
    info.update(cfg.extra)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    save_choices(choices, cfg.out, **info)
    return {"out": str(cfg.out), "choices": choices, **info}
