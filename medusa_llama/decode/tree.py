"""Candidate trees in the ``medusa_choices`` format, and the buffers that verify them in one pass.

A tree is a list of paths of top-k ranks: ``[0, 1]`` is head 1's rank-0 token followed by head 2's rank-1 token
(the format of the reference Medusa code and TensorRT-LLM). Node 0 is the root: the token the backbone already
chose, whose KV entry is not cached yet. Node ``i`` at depth ``d`` sits at position ``cache_len + d`` and attends
to the cached prefix, the root and its own ancestors (Medusa, Sec. 2.1.2; SpecInfer's tree attention).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from medusa_llama.errors import MedusaError

Path_ = tuple[int, ...]


def validate_choices(choices, num_heads: int | None = None) -> list[Path_]:
    """Check a ``medusa_choices`` list; return it as sorted tuples. Raises ``ValueError`` naming the bad path.

    The empty list is the root alone: vanilla decoding, which the tree optimizer picks where no tree pays."""
    if not isinstance(choices, (list, tuple)):
        raise ValueError("a tree must be a list of paths such as [[0], [0, 0], [1]] ([] for vanilla decoding)")
    paths: set[Path_] = set()
    for raw in choices:
        if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(r, int) and r >= 0 for r in raw):
            raise ValueError(f"tree path {raw!r} must be a non-empty list of non-negative integer ranks")
        path = tuple(raw)
        if path in paths:
            raise ValueError(f"tree path {list(path)} appears twice")
        if num_heads is not None and len(path) > num_heads:
            raise ValueError(f"tree path {list(path)} is {len(path)} deep but there are only {num_heads} heads")
        paths.add(path)
    for path in paths:
        if len(path) > 1 and path[:-1] not in paths:
            raise ValueError(f"tree path {list(path)} has no parent {list(path[:-1])} in the tree")
    return sorted(paths, key=lambda p: (len(p), p))


@dataclass(frozen=True)
class Tree:
    """The frozen tensors that describe one tree (root included; T = number of nodes). Built by ``build_tree``."""

    paths: tuple[Path_, ...]
    """Node i (1..T-1) is ``paths[i-1]``; the root has the empty path."""
    depth: torch.Tensor
    """(T,) long: depth of each node, 0 for the root; its position is cache_len + depth."""
    rank: torch.Tensor
    """(T,) long: top-k rank of each node's token under its head (0 for the root)."""
    parent: torch.Tensor
    """(T,) long: parent node index (-1 for the root)."""
    mask: torch.Tensor
    """(T, T) bool: mask[i, j] = node j is node i or one of its ancestors."""
    retrieve: torch.Tensor
    """(P, D+1) long: every root-to-leaf path as node indices, padded with -1 (P leaves, D max depth)."""
    levels: tuple[tuple[int, int], ...]
    """For each depth d in 0..D: (first, end) node index range (nodes are sorted by depth)."""
    expanders: tuple[torch.Tensor, ...]
    """For depth d in 0..D-1: (n_d,) the nodes at depth d that have children (one batched head call each)."""
    child_slot: torch.Tensor
    """(T,) long: for node i > 0, the row of its parent in ``expanders[depth-1]`` (0 for the root)."""
    level_topk: tuple[int, ...]
    """For depth d in 1..D (index d-1): how many top-k candidates the head at that depth must give."""
    # Static gather indices of the proposal (``proposal.py``), computed here once so that each depth of a step
    # gathers with one op instead of recomputing them from ``child_slot`` and ``rank``.
    expander_rows: tuple[torch.Tensor, ...]
    """For depth d in 0..D-1: (n_d,) ``child_slot`` of ``expanders[d]``: each expander's parent row in depth d-1's
    head call (zeros at d = 0, the root's one row)."""
    expander_columns: tuple[torch.Tensor, ...]
    """For depth d in 0..D-1: (n_d,) each expander's entry in depth d-1's flattened top-k list (n_{d-1} * k_d):
    ``child_slot * k + rank`` (zeros at d = 0: the root's token is not a head's)."""
    node_columns: torch.Tensor
    """(T-1,) node i's (from 1) entry in the depths' flattened top-k lists concatenated (sequential heads)."""
    parallel_columns: torch.Tensor
    """(T-1,) node i's (from 1) entry in the flattened (D, max k) top-k lists of ``medusa`` heads (one per depth)."""

    @property
    def size(self) -> int:
        return int(self.depth.numel())

    @property
    def max_depth(self) -> int:
        return len(self.levels) - 1

    @property
    def max_rank(self) -> int:
        return int(self.rank.max())

    def to(self, device) -> Tree:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in fields.items():
            if isinstance(v, torch.Tensor):
                fields[k] = v.to(device)
            elif v and isinstance(v, tuple) and isinstance(v[0], torch.Tensor):
                fields[k] = tuple(t.to(device) for t in v)
        return Tree(**fields)


def build_tree(choices, num_heads: int | None = None) -> Tree:
    """Pure function: ``medusa_choices`` -> ``Tree``. Raises ``ValueError`` for a bad tree."""
    paths = validate_choices(choices, num_heads)
    index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    t = len(paths) + 1
    depth = torch.tensor([0] + [len(p) for p in paths])
    rank = torch.tensor([0] + [p[-1] for p in paths])
    parent = torch.tensor([-1] + [index[p[:-1]] for p in paths])
    mask = torch.eye(t, dtype=torch.bool)
    for p, i in index.items():
        for k in range(len(p)):
            mask[i, index[p[:k]]] = True
    has_child = {p[:-1] for p in paths}
    leaves = [p for p in [(), *paths] if p not in has_child]
    max_depth = int(depth.max())
    retrieve = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        for k in range(len(leaf) + 1):
            retrieve[row, k] = index[leaf[:k]]
    levels = tuple(
        (int((depth < d).sum()), int((depth <= d).sum())) for d in range(max_depth + 1)
    )  # nodes are sorted by depth
    expanders, slot_of = [], {}
    for d in range(max_depth):
        nodes = [i for p, i in sorted(index.items(), key=lambda kv: kv[1]) if len(p) == d and p in has_child]
        slot_of.update({n: s for s, n in enumerate(nodes)})
        expanders.append(torch.tensor(nodes, dtype=torch.long))
    child_slot = torch.tensor([0] + [slot_of[index[p[:-1]]] for p in paths])
    level_topk = tuple(max(p[-1] for p in paths if len(p) == d) + 1 for d in range(1, max_depth + 1))
    # entry of each node in its depth's flattened top-k list (parent row * k + rank), then in their concatenation
    local = [0] + [int(child_slot[i]) * level_topk[len(p) - 1] + p[-1] for i, p in enumerate(paths, 1)]
    starts = [0]
    for d in range(max_depth):
        starts.append(starts[-1] + len(expanders[d]) * level_topk[d])
    expander_rows = tuple(child_slot[e] if d else torch.zeros_like(e) for d, e in enumerate(expanders))
    expander_columns = tuple(torch.tensor([local[i] for i in e.tolist()], dtype=torch.long) for e in expanders)
    node_columns = torch.tensor([starts[len(p) - 1] + local[i] for i, p in enumerate(paths, 1)], dtype=torch.long)
    parallel_columns = (depth[1:] - 1) * max(level_topk, default=1) + rank[1:]
    return Tree(
        tuple(paths), depth, rank, parent, mask, retrieve, levels, tuple(expanders), child_slot, level_topk,
        expander_rows, expander_columns, node_columns, parallel_columns,
    )  # fmt: skip


# -- built-in trees -----------------------------------------------------------------------------------------------

# Per-depth top-k accuracies used to grow the built-in trees: head-1 top-1 about .35 and deeper heads
# about .25, each further rank worth about half the previous (the SmolLM2 probe in FACTS.md). The tree
# optimizer (`medusa-llama tree`) grows trees the same way from accuracies measured on your heads.
DEFAULT_ACCURACY = [[0.35 * 0.55**r for r in range(10)]] + [[0.25 * 0.55**r for r in range(10)]] * 3


def grow_tree(accuracy: list[list[float]], size: int) -> list[list[int]]:
    """Best-first tree of ``size`` non-root nodes maximising the expected accepted length.

    ``accuracy[d][r]`` is the probability that head d+1's rank-r token is right. A path's acceptance
    probability is modelled as the product of its ranks' accuracies; since that value only falls along a path
    and across siblings, growing from a max-heap of frontier nodes gives the best tree of each size.
    """
    depth_max, ranks = len(accuracy), min(len(a) for a in accuracy)
    chosen: list[list[int]] = []
    # heap entries: (-value of the path, path, value of its parent path)
    heap = [(-accuracy[0][0], (0,), 1.0)]
    while heap and len(chosen) < size:
        neg, path, parent_value = heapq.heappop(heap)
        chosen.append(list(path))
        d = len(path) - 1
        if path[-1] + 1 < ranks:  # next sibling
            heapq.heappush(heap, (-parent_value * accuracy[d][path[-1] + 1], path[:-1] + (path[-1] + 1,), parent_value))
        if len(path) < depth_max:  # first child
            heapq.heappush(heap, (neg * accuracy[d + 1][0], path + (0,), -neg))
    return chosen


def expected_accept_length(choices, accuracy: list[list[float]]) -> float:
    """Expected tokens per step under the product model: 1 (bonus token) + sum of path probabilities."""
    total = 1.0
    for path in choices:
        p = 1.0
        for d, r in enumerate(path):
            p *= accuracy[d][r] if r < len(accuracy[d]) else 0.0
        total += p
    return total


@cache
def _builtin() -> dict[str, tuple[tuple[int, ...], ...]]:
    trees = {"chain": [[0] * (d + 1) for d in range(4)]}
    for size in (15, 31, 63, 127):
        trees[f"tree{size + 1}"] = grow_tree(DEFAULT_ACCURACY, size)
    return {k: tuple(tuple(p) for p in v) for k, v in trees.items()}


BUILTIN_TREE_NAMES = ("chain", "tree16", "tree32", "tree64", "tree128")
DEFAULT_TREE = "tree64"


def builtin_tree(name: str) -> list[list[int]]:
    return [list(p) for p in _builtin()[name]]


def load_choices(spec: str) -> list[list[int]]:
    """A built-in tree name or a JSON file holding a list of paths (or ``{"medusa_choices": [...]}``)."""
    if spec in _builtin():
        return builtin_tree(spec)
    path = Path(spec)
    if not path.is_file():
        raise MedusaError(
            f"--tree {spec!r} is neither a built-in tree ({', '.join(BUILTIN_TREE_NAMES)}, dynamic<N>) nor a file"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedusaError(f"--tree file {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("medusa_choices")
    try:
        return [list(p) for p in validate_choices(data)]
    except (ValueError, TypeError) as exc:
        raise MedusaError(f"--tree file {path}: {exc}") from exc


def save_choices(choices, path: str | Path, **extra) -> None:
    Path(path).write_text(json.dumps({"medusa_choices": [list(p) for p in choices], **extra}, indent=1))
