"""Proposal: fill a candidate tree with the heads' top-k tokens (Cai et al., 2024, "Medusa", Sec. 2.1.2).

Node 0 is the root, the token the backbone chose after the last accepted one. A node at depth ``d`` with rank ``r``
holds the ``r``-th most likely token of head ``d`` (1-based), so the path ``[0, 1]`` is head 1's best token followed
by head 2's second best. The two head kinds fill the tree differently:

- ``medusa`` heads read only h_t, so each head runs once and every node at depth d reads the same top-k list;
- ``sequential`` heads also read the token before them on the path, so the tree grows depth by depth: one batched
  head call per depth over the nodes that have children there, each child reading its own parent's state.

With a draft vocabulary (``heads.DraftVocab``, FR-Spec) every projection and top-k runs over its N columns and the
chosen columns map back to token ids: the tree then holds only tokens of the draft vocabulary.

The functions are tensor-only with fixed shapes and no host syncs, so a whole decoding step (proposal included)
can be captured in one CUDA graph. Verification lives in ``acceptance.py``; this file only proposes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medusa_llama.decode.heads import DraftVocab, MedusaHeads, draft_tokens, draft_topk, project_draft
from medusa_llama.decode.topk import topk_indices
from medusa_llama.decode.tree import Tree


@torch.no_grad()
def propose(
    heads: MedusaHeads,
    hidden: torch.Tensor,
    root: torch.Tensor,
    tree: Tree,
    embed: Callable[[torch.Tensor], torch.Tensor],
    lm_head: nn.Module,
    draft: DraftVocab | None = None,
) -> torch.Tensor:
    """(T,) long: the token of every tree node, node 0 = ``root``.

    hidden: (D,) backbone state at the last accepted token. root: 0-d long, the token the backbone chose after it.
    embed: token ids (n,) -> (n, D), the backbone's input embedding (read by ``sequential`` heads only).
    lm_head: the backbone's LM head (used by heads with ``lm_head="shared"``).
    draft: a draft vocabulary to propose from (None: the full vocabulary).
    """
    tokens = root.new_zeros(tree.size)  # (T,)
    tokens[0] = root
    if heads.config.kind == "medusa":
        return _fill_parallel(heads, hidden, tree, lm_head, tokens, draft)
    return _fill_sequential(heads, hidden, tree, embed, lm_head, tokens, draft)


def _fill_parallel(heads: MedusaHeads, hidden: torch.Tensor, tree: Tree, lm_head, tokens: torch.Tensor, draft=None):
    """``medusa`` heads: one top-k list per depth; node i takes entry ``rank[i]`` of its depth's list."""
    depth = tree.max_depth
    states = heads.chain_states(hidden)  # K x (D,), all read h_t
    logits = torch.stack([project_draft(heads, d, states[d], lm_head, draft) for d in range(depth)])  # (depth, V|N)
    top = draft_tokens(topk_indices(logits, max(tree.level_topk)), draft)  # (depth, k) token ids
    tokens[1:] = top[tree.depth[1:] - 1, tree.rank[1:]]  # (T-1,) gather by (depth - 1, rank)
    return tokens


def _fill_sequential(
    heads: MedusaHeads, hidden: torch.Tensor, tree: Tree, embed, lm_head, tokens: torch.Tensor, draft=None
):
    """``sequential`` heads: depth by depth, each child's head reads its parent's state and its parent's token."""
    prev = hidden[None]  # (1, D): the state the root's children are predicted from
    for d, nodes in enumerate(tree.expanders):  # nodes: (n_d,) nodes at depth d that have children
        parent_rows = tree.child_slot[nodes] if d > 0 else torch.zeros_like(nodes)  # (n_d,) rows of `prev`
        state = heads.head_state(d, prev[parent_rows], embed(tokens[nodes]))  # (n_d, D)
        top = draft_topk(heads, d, state, lm_head, tree.level_topk[d], draft)  # (n_d, k_d) token ids
        lo, hi = tree.levels[d + 1]
        tokens[lo:hi] = top[tree.child_slot[lo:hi], tree.rank[lo:hi]]  # each child: its parent's row, its rank
        prev = state
    return tokens
