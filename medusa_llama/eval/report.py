"""Writing a benchmark report: the JSON, a Markdown summary beside it, and two PNG plots.

``report.json`` -> ``report.md``, ``report_acceptance.png`` (acceptance rate by tree depth) and
``report_tokens_per_s.png`` (tokens/s per method).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

METHOD_LABELS = {
    "vanilla": "vanilla (ours)",
    "medusa": "Medusa (ours)",
    "hf_generate": "HF generate",
    "hf_prompt_lookup": "HF prompt lookup",
}


def _f(x, fmt: str = ".2f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{unit}"


def markdown(report: dict) -> str:
    """A Markdown summary: setup, a per-method table, acceptance by depth, and a per-prompt table."""
    ev = report.get("expected_vs_measured") or {}
    lines = [
        "# Medusa benchmark",
        "",
        f"- model: `{report.get('model')}`, heads: `{report.get('heads')}`, backend {report.get('backend')}, "
        f"dtype {report.get('dtype')}" + (f", LoRA adapter `{report['adapter']}`" if report.get("adapter") else ""),
        f"- device: {report.get('device')}",
        f"- tree: {report.get('tree')} ({report.get('tree_size')} tokens, depth {report.get('tree_depth')}), "
        f"acceptance {report.get('acceptance')}, {len(report['prompts'])} prompts x {report.get('max_new_tokens')} "
        "new tokens",
        f"- Medusa output identical to vanilla greedy: **{'yes' if report['identical'] else 'NO'}** "
        f"({report.get('identical_prompts')}/{len(report['prompts'])} prompts)",
        f"- mean accepted tokens per step (bonus counted): **{_f(report['mean_accepted_tokens'])}**"
        + (
            f" (expected from head accuracies: {_f(ev.get('expected_accepted_tokens'))})"
            if ev.get("expected_accepted_tokens")
            else ""
        ),
        f"- speedup over vanilla: **{_f(report['speedup'], '.2f', 'x')}**"
        + "".join(
            f", over {METHOD_LABELS.get(k, k)}: {_f(v, '.2f', 'x')}"
            for k, v in (report.get("speedups") or {}).items()
            if k != "vanilla"
        ),
        "",
        "| method | tokens/s | decode tokens/s | accepted/step | ITL p50 ms | ITL p90 ms | TTFT ms | wall s | "
        "Medusa speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = [
        "",
        "ITL: inter-token latency, the time between consecutive new tokens (tokens accepted in one step count 0). "
        "TTFT: time to first token. tokens/s counts the whole call, prefill included; decode tokens/s excludes it.",
    ]
    for name, m in report["methods"].items():
        speed = "-" if name == "medusa" else _f((report.get("speedups") or {}).get(name), ".2f", "x")
        label = METHOD_LABELS.get(name, name)
        lines.append(
            f"| {label} | {_f(m['tokens_per_s'], '.1f')} | {_f(m['decode_tokens_per_s'], '.1f')}"
            f" | {_f(m['mean_accepted_tokens'])} | {_f(m['latency_p50_ms'], '.1f')} | {_f(m['latency_p90_ms'], '.1f')}"
            f" | {_f(m['ttft_ms'], '.1f')} | {_f(m['wall_s'], '.1f')} | {speed} |"
        )
    lines += notes
    lines += step_breakdown_lines(report)
    depth = report.get("acceptance_by_depth") or []
    if depth:
        lines += ["", "Acceptance rate by depth (share of steps whose accepted path reached depth d):", ""]
        lines += ["| " + " | ".join(f"d={d + 1}" for d in range(len(depth))) + " |", "|---" * len(depth) + "|"]
        lines += ["| " + " | ".join(f"{a:.3f}" for a in depth) + " |"]
    lines += ["", "| prompt | prompt tokens | new tokens | accepted/step | Medusa tok/s | vanilla tok/s | speedup | "
              "identical |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in report["prompts"]:
        med, van = p["methods"]["medusa"], p["methods"]["vanilla"]
        lines.append(
            f"| {p['id']} | {p['prompt_tokens']} | {med['new_tokens']} | {_f(med['mean_accepted_tokens'])} | "
            f"{_f(med['tokens_per_s'], '.1f')} | {_f(van['tokens_per_s'], '.1f')} | {_f(p['speedup'], '.2f', 'x')} | "
            f"{'yes' if p['identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


BREAKDOWN_COLUMNS = {
    "verify_forward": "verify forward",
    "lm_head": "LM head",
    "acceptance": "acceptance",
    "proposal": "proposal",
    "commit": "commit",
    "total": "total",
}


def step_breakdown_lines(report: dict) -> list[str]:
    """The step breakdown table (``step_breakdown_ms``): milliseconds per decode step by phase, per decoder."""
    breakdown = report.get("step_breakdown_ms") or {}
    if not breakdown:
        return []
    lines = [
        "",
        f"Where a decode step's time goes, ms per step (median of {report.get('step_breakdown_steps', '?')} steps on "
        "the first prompt, measured in a separate eager pass that synchronises the device after each phase; on a "
        "GPU the timed runs replay the whole step as one CUDA graph, so read proportions there):",
        "",
        "| method | " + " | ".join(BREAKDOWN_COLUMNS.values()) + " | ms per token |",
        "|---" * (len(BREAKDOWN_COLUMNS) + 2) + "|",
    ]
    for name, ms in breakdown.items():
        accepted = (report["methods"].get(name) or {}).get("mean_accepted_tokens") or 1.0
        cells = " | ".join(_f(ms.get(k), ".2f") for k in BREAKDOWN_COLUMNS)
        lines.append(f"| {METHOD_LABELS.get(name, name)} | {cells} | {_f(ms['total'] / accepted, '.2f')} |")
    return lines


def plot(report: dict, stem: Path) -> list[Path]:
    """Two PNGs beside the report; skipped (with a log line) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    depth = report.get("acceptance_by_depth") or []
    if depth:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar(range(1, len(depth) + 1), depth, color="#7b4fb0")
        ax.set_xlabel("tree depth d")
        ax.set_ylabel("share of steps accepting depth d")
        ax.set_ylim(0, 1)
        ax.set_xticks(range(1, len(depth) + 1))
        ax.set_title(f"Acceptance by depth ({report.get('tree')}, {report.get('tree_size')} tokens)")
        fig.tight_layout()
        path = stem.with_name(stem.name + "_acceptance.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    names = [n for n, m in report["methods"].items() if m.get("tokens_per_s")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [report["methods"][n]["tokens_per_s"] for n in names]
    colors = ["#7b4fb0" if n == "medusa" else "#999999" for n in names]
    ax.bar([METHOD_LABELS.get(n, n) for n in names], values, color=colors)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(0, max(values, default=1) * 1.15)  # room for the value labels
    model = str(report.get("model")).rsplit("/", 1)[-1]
    device = str(report.get("device")).split(" (")[0]
    ax.set_title(f"{model}, tree {report.get('tree_size')} tokens, {device}", fontsize=9)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_tokens_per_s.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def write_report(report: dict, out: str | Path) -> list[Path]:
    """Write ``out`` (JSON), ``<stem>.md`` and the PNGs; return the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    md = stem.with_suffix(".md")
    paths = [out, md, *plot(report, stem)]
    md.write_text(markdown(report))
    report["files"] = [str(p) for p in paths]
    out.write_text(json.dumps(report, indent=1))
    log.info("report: %s", ", ".join(str(p) for p in paths))
    return paths
