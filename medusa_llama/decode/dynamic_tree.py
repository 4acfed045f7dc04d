"""Dynamic trees: each step's tree shaped by the heads' confidences within a fixed budget of N nodes.

EAGLE-2 (Li et al., 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees", arXiv:2406.16858,
Sec. 4) with Medusa heads as the draft. A node's value is its path probability, the product of the heads' softmax
probabilities along its path from the root (EAGLE-2's estimate of its acceptance probability). Each step:

1. expand: depth 1 holds head 1's top-k tokens; at each depth d = 1 .. K-1 the k nodes of highest value (the
   frontier) each get their top-k children from head d+1 (``sequential`` heads read the frontier node's own token
   and its parent's state; ``medusa`` heads give every node of a depth the same list). That is a fixed set of
   C = k + (K-1) k^2 candidates for K heads, and siblings always hold distinct tokens (one top-k list).
2. rerank: the N-1 candidates of highest value form the tree with the root. A child's value is kept strictly below
   its parent's (one float step below where the product rounds to the parent's value), so a top-(N-1) selection
   by value always holds a selected node's parent: the selection is a tree.
3. build the step's tree tensors from the selection (``tree_tensors``): parent, depth (position = cache_len +
   depth), the ancestor mask for verification, and one root-to-node path per node for acceptance.

With a draft vocabulary (``heads.DraftVocab``, FR-Spec) ``next_logp`` gives log-probabilities over its N tokens
only: a softmax over the subset, so values are path probabilities renormalised to the subset. That only reorders
which candidates are kept (the subset holds nearly all of the heads' mass on frequent tokens); verification is
unchanged, so decoding stays lossless.

All of it is tensor ops of fixed shapes with no host sync, so a step with a dynamic tree stays one CUDA graph. The
step's tree lives in the fixed buffers of a ``StepTree``, which ``MedusaDecoder`` overwrites after each proposal;
the acceptance rules read it exactly like a static ``Tree``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from medusa_llama.decode.heads import DraftVocab, MedusaHeads, draft_tokens, project_draft

DYNAMIC_SPEC = re.compile(r"dynamic(\d+)(?:k(\d+))?")
"""``--tree dynamic64``: 64 nodes per step, root included; ``dynamic64k10``: and k = 10."""
DEFAULT_TOPK = 8
MIN_LOGP = -1e4
"""Log-probabilities are clamped here so values stay finite (-inf ties could select a child without its parent)."""

NextLogp = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``next_logp(d, rows, tokens)``: (n, V) float32 log-probabilities of head d+1 (0-based ``d``) for the children of
n nodes at depth d (or (n, N) over a draft vocabulary's columns), given each node's token (n,) and ``rows`` (n,),
the row of its parent in the previous call's output (all zeros for the root at d = 0)."""


@dataclass(frozen=True)
class DynamicTree:
    """A dynamic tree's fixed sizes (the step's tree itself is chosen on the device each step)."""

    budget: int
    """N: nodes per step, root included (capped at 1 + the number of candidates)."""
    topk: int = DEFAULT_TOPK
    """k: children per expanded node, and nodes expanded per depth."""
    depth: int = 4
    """K: the tree's maximum depth, the number of heads used."""

    def __post_init__(self):
        if self.budget < 2:
            raise ValueError(f"--tree dynamic{self.budget}: a dynamic tree needs a budget of at least 2 nodes")
        if self.topk < 1:
            raise ValueError(f"--tree dynamic{self.budget}k{self.topk}: k must be >= 1")
        if self.depth < 1:
            raise ValueError(f"dynamic tree depth must be >= 1, got {self.depth}")

    @property
    def candidates(self) -> int:
        """C: candidate nodes expanded each step (root excluded)."""
        return self.topk + (self.depth - 1) * self.topk**2

    @property
    def size(self) -> int:
        """T: nodes in each step's tree, root included."""
        return min(self.budget, 1 + self.candidates)

    @property
    def max_depth(self) -> int:
        return self.depth


def parse_dynamic(spec: str | None, num_heads: int) -> DynamicTree | None:
    """``dynamic<N>`` or ``dynamic<N>k<k>`` as a ``DynamicTree`` over all ``num_heads`` heads; None for other specs."""
    match = DYNAMIC_SPEC.fullmatch(spec or "")
    if match is None:
        return None
    return DynamicTree(int(match[1]), int(match[2] or DEFAULT_TOPK), num_heads)


@dataclass(frozen=True)
class StepTree:
    """One step's tree in fixed buffers (T nodes, depth <= K): the fields the acceptance rules read from a ``Tree``."""

    depth: torch.Tensor
    """(T,) long: depth of each node, 0 for the root."""
    parent: torch.Tensor
    """(T,) long: parent node index (-1 for the root)."""
    mask: torch.Tensor
    """(T, T) bool: mask[i, j] = node j is node i or one of its ancestors."""
    retrieve: torch.Tensor
    """(T, K+1) long: row i is the root-to-node-i path as node indices, padded with -1."""

    @property
    def size(self) -> int:
        return int(self.depth.numel())

    @property
    def max_depth(self) -> int:
        return self.retrieve.shape[1] - 1

    @classmethod
    def star(cls, spec: DynamicTree, device=None) -> StepTree:
        """A valid placeholder until the first proposal: every node a child of the root."""
        parent = torch.zeros(spec.size, dtype=torch.long, device=device)
        parent[0] = -1
        return tree_tensors(parent, (parent >= 0).long(), spec.depth)

    def to(self, device) -> StepTree:
        return StepTree(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def copy_(self, other: StepTree) -> None:
        """Overwrite the buffers in place (a captured CUDA graph keeps reading the same memory)."""
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))


def tree_tensors(parent: torch.Tensor, depth: torch.Tensor, max_depth: int) -> StepTree:
    """parent (T,) (-1 for the root, node 0), depth (T,) -> the ancestor mask and root-to-node paths. Tensor-only."""
    t = parent.numel()
    up = parent.clamp(min=0)  # the root is its own parent, so K+1 hops from any node end at the root
    mask = torch.zeros(t, t, dtype=torch.bool, device=parent.device)
    retrieve = torch.full((t, max_depth + 1), -1, dtype=torch.long, device=parent.device)
    cur = torch.arange(t, device=parent.device)  # (T,) each node's ancestor `hop` steps up
    for _ in range(max_depth + 1):
        mask.scatter_(1, cur[:, None], True)  # (T, T): node i sees its ancestor cur[i]
        retrieve.scatter_(1, depth[cur][:, None], cur[:, None])  # (T, K+1): the ancestor in its depth's column
        cur = up[cur]
    return StepTree(depth, parent, mask, retrieve)


@dataclass(frozen=True)
class Candidates:
    """The expanded candidate set, candidate 0 the root; (C+1,) each."""

    token: torch.Tensor
    parent: torch.Tensor
    """Candidate index of the parent (-1 for the root)."""
    depth: torch.Tensor
    value: torch.Tensor
    """float32 log path probability, strictly below the parent's."""


def expand(next_logp: NextLogp, root: torch.Tensor, spec: DynamicTree, draft: DraftVocab | None = None) -> Candidates:
    """Step 1 (see the module docstring): the fixed candidate set grown from ``next_logp``. root: 0-d long.
    draft: the draft vocabulary whose columns ``next_logp`` returns (None: columns are token ids)."""
    k, dev = spec.topk, root.device
    lp, col = next_logp(0, torch.zeros(1, dtype=torch.long, device=dev), root.view(1)).topk(k, dim=-1)  # (1, k)
    tok = draft_tokens(col, draft)  # (1, k) token ids
    zero = torch.zeros(1, device=dev)  # the root's value
    below = torch.nextafter(zero, torch.full_like(zero, -torch.inf))  # (1,) just under the root's value
    value = torch.minimum(lp[0].clamp_min(MIN_LOGP), below)  # (k,) depth-1 values
    token, rows = tok[0], torch.zeros(k, dtype=torch.long, device=dev)  # rows: each candidate's parent state row
    parts = [  # token, parent, depth, value of the root and depth 1
        [root.view(1), token],
        [torch.full((1,), -1, dtype=torch.long, device=dev), torch.zeros(k, dtype=torch.long, device=dev)],
        [torch.zeros(1, dtype=torch.long, device=dev), torch.ones(k, dtype=torch.long, device=dev)],
        [zero, value],
    ]
    start = 1  # candidate index of the current depth's first node
    for d in range(1, spec.depth):
        f_value, f = value.topk(k)  # (k,) the frontier: the current depth's k best nodes
        lp, col = next_logp(d, rows[f], token[f]).topk(k, dim=-1)  # (k, k) each frontier node's children
        tok = draft_tokens(col, draft)  # (k, k) token ids
        below = torch.nextafter(f_value, torch.full_like(f_value, -torch.inf))  # (k,) just under each parent
        value = torch.minimum(f_value[:, None] + lp.clamp_min(MIN_LOGP), below[:, None]).flatten()  # (k*k,)
        token = tok.flatten()  # (k*k,) row-major: frontier node j's children are j*k .. j*k+k-1
        rows = torch.arange(k, device=dev)[:, None].expand(k, k).flatten()  # (k*k,) the frontier row of each child
        parts[0].append(token)
        parts[1].append((start + f)[:, None].expand(k, k).flatten())  # (k*k,) candidate index of each parent
        parts[2].append(torch.full((k * k,), d + 1, dtype=torch.long, device=dev))
        parts[3].append(value)
        start += k if d == 1 else k * k
    return Candidates(*(torch.cat(p) for p in parts))


def select(c: Candidates, spec: DynamicTree) -> tuple[torch.Tensor, StepTree]:
    """Steps 2 and 3: the ``spec.size - 1`` best candidates and the root as a tree. -> (tokens (T,), StepTree)."""
    t = spec.size
    chosen = c.value[1:].topk(t - 1).indices + 1  # (T-1,) candidate ids, root excluded
    # Candidate ids run by depth, then by frontier node, then by rank: sorted, parents come before children.
    ids = torch.cat([torch.zeros(1, dtype=torch.long, device=chosen.device), chosen.sort().values])  # (T,)
    node_of = torch.full_like(c.token, -1)  # (C+1,) node index of each selected candidate
    node_of.scatter_(0, ids, torch.arange(t, device=ids.device))
    parent = torch.where(c.parent[ids] >= 0, node_of[c.parent[ids].clamp(min=0)], -1)  # (T,)
    return c.token[ids], tree_tensors(parent, c.depth[ids], spec.depth)


def head_logp(
    heads: MedusaHeads,
    hidden: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    lm_head: nn.Module,
    draft: DraftVocab | None = None,
) -> NextLogp:
    """The heads as ``next_logp`` from the backbone state ``hidden`` (D,) at the last accepted token (over the draft
    vocabulary's columns when one is given)."""
    if heads.config.kind == "medusa":
        states = heads.chain_states(hidden)  # K x (D,), all read h_t

        def parallel(d: int, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            logp = torch.log_softmax(project_draft(heads, d, states[d], lm_head, draft).float(), dim=-1)  # (V|N,)
            return logp.expand(tokens.shape[0], -1)  # (n, V|N): the same list for every node of a depth

        return parallel
    prev = [hidden[None]]  # (1, D): the state the root's children are predicted from

    def sequential(d: int, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        state = heads.head_state(d, prev[0][rows], embed(tokens))  # (n, D)
        prev[0] = state
        return torch.log_softmax(project_draft(heads, d, state, lm_head, draft).float(), dim=-1)  # (n, V|N)

    return sequential


@torch.no_grad()
def propose(
    heads: MedusaHeads,
    hidden: torch.Tensor,
    root: torch.Tensor,
    spec: DynamicTree,
    embed: Callable[[torch.Tensor], torch.Tensor],
    lm_head: nn.Module,
    draft: DraftVocab | None = None,
) -> tuple[torch.Tensor, StepTree]:
    """This step's tree and its tokens (T,), node 0 = ``root``. Arguments as ``proposal.propose``."""
    return select(expand(head_logp(heads, hidden, embed, lm_head, draft), root, spec, draft), spec)
