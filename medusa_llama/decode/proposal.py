"""Proposal: fill a candidate tree with the heads' top-k tokens (Cai et al., 2024, "Medusa", Sec. 2.1.2).

Node 0 is the root, the token the backbone chose after the last accepted one. A node at depth ``d`` with rank ``r``
holds the ``r``-th most likely token of head ``d`` (1-based), so the path ``[0, 1]`` is head 1's best token followed
by head 2's second best. The two head kinds fill the tree differently:

- ``medusa`` heads read only h_t, so each head runs once and every node at depth d reads the same top-k list;
- ``sequential`` heads also read the token before them on the path, so the tree grows depth by depth: one batched
  head call per depth over the nodes that have children there, each child reading its own parent's state.

With a draft vocabulary (``heads.DraftVocab``, FR-Spec) every projection and top-k runs over its N columns and the
chosen columns map back to token ids: the tree then holds only tokens of the draft vocabulary.

On a GPU the step's cost outside the verify forward is its kernel count, so each depth gathers with the tree's
static indices (``Tree.expander_rows`` / ``expander_columns`` / ``node_columns``, built once) and the chosen
columns' embeddings come from the draft vocabulary's own rows: a depth is two gathers, the embedding, the head (two
GEMMs and, ``fused``, one Triton kernel), the projection and the top-k; the tree's tokens are one gather at the end.

The functions are tensor-only with fixed shapes and no host syncs, so a whole decoding step (proposal included)
can be captured in one CUDA graph. Leading dimensions are a batch of sequences (``batch.py``), each its own tree.
Verification lives in ``acceptance.py``; this file only proposes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medusa_llama.decode.heads import DraftVocab, MedusaHeads, draft_embed, draft_tokens, project_draft
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
    fused: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(..., T) long: the token of every tree node, node 0 = ``root``, written into ``out`` where given.

    hidden: (..., D) backbone state at the last accepted token. root: (...) long, the token the backbone chose after
    it; leading dimensions (none for one sequence) are a batch of rows, the heads run once for all.
    embed: token ids (n,) -> (n, D), the backbone's input embedding (read by ``sequential`` heads only).
    lm_head: the backbone's LM head (used by heads with ``lm_head="shared"``).
    draft: a draft vocabulary to propose from (None: the full vocabulary).
    fused: the sequential heads' Triton kernel (``heads.SequentialBlock``; the decoders' GPU path).
    """
    h, r = hidden.reshape(-1, hidden.shape[-1]), root.reshape(-1)  # (B, D), (B,)
    if heads.config.kind == "medusa":
        children = _parallel_children(heads, h, tree, lm_head, draft)
    else:
        children = _sequential_children(heads, h, r, tree, embed, lm_head, draft, fused)
    if out is None:
        out = r.new_empty(*root.shape, tree.size)
    torch.cat([r[:, None], children], dim=1, out=out.view(-1, tree.size))  # (B, T): the root, then its tree
    return out


def _parallel_children(heads: MedusaHeads, hidden: torch.Tensor, tree: Tree, lm_head, draft=None) -> torch.Tensor:
    """``medusa`` heads: one top-k list per depth; node i takes entry ``rank[i]`` of its depth's list.
    hidden (B, D) -> (B, T-1) token ids of nodes 1 ..."""
    states = heads.chain_states(hidden)  # K x (B, D), all read h_t
    logits = torch.stack([project_draft(heads, d, states[d], lm_head, draft) for d in range(tree.max_depth)], 1)
    top = topk_indices(logits, max(tree.level_topk)).flatten(1)  # (B, depth * k) from (B, depth, V|N)
    return draft_tokens(top.index_select(1, tree.parallel_columns), draft)  # (B, T-1) by (depth - 1, rank)


def _sequential_children(
    heads: MedusaHeads, hidden: torch.Tensor, root: torch.Tensor, tree: Tree, embed, lm_head, draft, fused: bool
) -> torch.Tensor:
    """``sequential`` heads: depth by depth, each child's head reads its parent's state and its parent's token.
    hidden (B, D), root (B,) -> (B, T-1) token ids of nodes 1 ..."""
    prev, emb = hidden[:, None], embed(root)[:, None]  # (B, 1, D): the root's state and token (any of the vocabulary)
    tops = []
    for d in range(tree.max_depth):  # one batched head call over the n_d expanders of depth d
        state = heads.head_state(d, prev, emb, fused)  # (B, n_d, D)
        top = topk_indices(project_draft(heads, d, state, lm_head, draft), tree.level_topk[d]).flatten(1)
        tops.append(top)  # (B, n_d * k_d) columns: row j's children j * k_d ...
        if d + 1 < tree.max_depth:  # the next depth's expanders: each one's parent state and its own token
            prev = state.index_select(1, tree.expander_rows[d + 1])  # (B, n_{d+1}, D)
            emb = draft_embed(top.index_select(1, tree.expander_columns[d + 1]), embed, draft)  # (B, n_{d+1}, D)
    return draft_tokens(torch.cat(tops, 1).index_select(1, tree.node_columns), draft)  # (B, T-1)
