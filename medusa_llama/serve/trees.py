"""The server's tree per batch size: smaller trees at larger batches, vanilla decoding where no tree pays.

A tree's verify forward costs B x T tokens; at B = 1 the GPU has room to spare and a large tree is nearly free, at
B = 32 it is already busy and extra tree nodes cost real time while the accepted tokens per step stay the same. So
the tree that pays depends on B, and ``benchmarks/batch_throughput.py --write-serve-trees`` measures it: for each B,
batched vanilla against batched Medusa with a few trees, the fastest kept. The result is ``serve_trees.json`` beside
the heads, one table per device type::

    {"cuda": {"trees": {"1": [[0], [0, 0], ...], "8": [[0], [1], [0, 0]], "32": []},
              "produced_by": "...", "measured": [...]},
     "cpu":  {...}}

A tree is a list of medusa_choices paths; ``[]`` is the root alone: vanilla decoding. ``medusa-llama serve`` without
``--tree`` takes the entry of the largest table batch size <= its ``--batch-size`` (below the smallest one: the
smallest one's tree); an explicit ``--tree`` always wins. Importing this needs no web stack.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from medusa_llama.decode.dynamic_tree import StepTree
from medusa_llama.decode.heads import MedusaHeads
from medusa_llama.decode.tree import Tree, build_tree, validate_choices
from medusa_llama.errors import MedusaError
from medusa_llama.pipeline import Pipeline, fit_tree
from medusa_llama.serve.config import ServeConfig

log = logging.getLogger(__name__)

TABLE_NAME = "serve_trees.json"


@dataclass(frozen=True)
class TreeChoice:
    """The tree a table gives one batch size."""

    choices: list[list[int]]
    """medusa_choices paths; [] means vanilla decoding (no heads run)."""
    table_batch_size: int
    """The table's key the entry came from (the largest <= the server's batch size)."""
    source: str
    """The table file and device type, for the log."""

    @property
    def vanilla(self) -> bool:
        return not self.choices

    @property
    def size(self) -> int:
        """Tree nodes, root included."""
        return len(self.choices) + 1


def table_path(heads_dir: Path | None) -> Path | None:
    """``serve_trees.json`` beside the heads, if there is one."""
    if heads_dir is None:
        return None
    path = (heads_dir if heads_dir.is_dir() else heads_dir.parent) / TABLE_NAME
    return path if path.is_file() else None


def read_table(path: Path | str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedusaError(f"tree table {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MedusaError(f"tree table {path}: expected an object keyed by device type (cuda, cpu)")
    return data


def trees_for_device(table: dict, device_type: str, source: str = "") -> dict[int, list[list[int]]]:
    """The table's {batch size: tree} for one device type ({} when the table has none for it)."""
    entry = table.get(device_type)
    if entry is None:
        return {}
    trees = entry.get("trees") if isinstance(entry, dict) else None
    if not isinstance(trees, dict):
        raise MedusaError(f"tree table {source}: {device_type!r} must hold a 'trees' object {{batch size: tree}}")
    out = {}
    for key, choices in trees.items():
        try:
            b = int(key)
            if b < 1:
                raise ValueError
            out[b] = [list(p) for p in validate_choices(choices)]
        except (ValueError, TypeError) as exc:
            raise MedusaError(f"tree table {source}: {device_type} batch size {key!r}: {exc or 'not >= 1'}") from None
    return out


def choose_tree(path: Path | str, device_type: str, batch_size: int) -> TreeChoice | None:
    """The tree the table at ``path`` gives ``batch_size`` on ``device_type``: the entry of the largest table batch
    size <= ``batch_size`` (the smallest one's below it). None when the table has no entry for this device type."""
    trees = trees_for_device(read_table(path), device_type, str(path))
    if not trees:
        return None
    lower = [b for b in trees if b <= batch_size]
    key = max(lower) if lower else min(trees)
    return TreeChoice(trees[key], key, f"{path} ({device_type})")


def write_device_table(path: Path | str, device_type: str, trees: dict[int, list], **notes) -> dict:
    """Write (or replace) one device type's table in the file at ``path``, keeping the other device types' tables.
    ``notes`` (how it was produced, the measurements) are stored beside the trees. Returns the whole file's data."""
    path = Path(path)
    data = read_table(path) if path.is_file() else {}
    data[device_type] = {"trees": {str(b): trees[b] for b in sorted(trees)}, **notes}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # atomic: an interrupted write never leaves half a table
    return data


def prefix_tree(choices: list[list[int]], size: int) -> list[list[int]]:
    """The first ``size - 1`` paths of a best-first grown tree (a path whose parent was not taken is skipped): a
    smaller tree of ``size`` nodes with the most probable nodes of the large one. ``size`` 1: [] (vanilla)."""
    kept: list[list[int]] = []
    taken: set[tuple[int, ...]] = set()
    for p in choices:
        if len(kept) >= size - 1:
            break
        if len(p) == 1 or tuple(p[:-1]) in taken:
            kept.append(list(p))
            taken.add(tuple(p))
    return kept


def serve_tree(pipe: Pipeline, cfg: ServeConfig) -> tuple[MedusaHeads | None, Tree | StepTree | None]:
    """(heads, tree) to serve: the pipeline's, or, when no ``--tree`` was given and ``cfg.tree_table`` names a table
    with an entry for this device type, that entry's tree (heads None where it is empty: vanilla decoding)."""
    explicit = pipe.options.tree not in (None, "default")
    if pipe.heads is None or explicit or cfg.tree_table is None:
        why = "no heads" if pipe.heads is None else ("--tree" if explicit else "no tree table")
        log.info("batch size %d: serving the pipeline's tree (%s)", cfg.batch_size, why)
        return pipe.heads, pipe.tree
    choice = choose_tree(cfg.tree_table, pipe.backbone.device.type, cfg.batch_size)
    if choice is None:
        log.info(
            "batch size %d: %s has no %s entry; serving the pipeline's tree",
            cfg.batch_size,
            cfg.tree_table,
            pipe.backbone.device.type,
        )
        return pipe.heads, pipe.tree
    log.info(
        "batch size %d: serving %s from %s, entry for batch size %d",
        cfg.batch_size,
        "vanilla decoding (no tree)" if choice.vanilla else f"a {choice.size}-node tree",
        choice.source,
        choice.table_batch_size,
    )
    if choice.vanilla:
        return None, None
    k = pipe.heads.num_heads
    try:
        return pipe.heads, build_tree(fit_tree(choice.choices, k), k)
    except MedusaError as exc:
        raise MedusaError(f"--tree-table {cfg.tree_table}: {exc}") from None
