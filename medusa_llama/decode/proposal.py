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
columns' embeddings come from the draft vocabulary's own rows. On the PyTorch path a depth is two gathers, the
embedding, the head (two GEMMs and the SiLU residual), the projection and the top-k, and the tree's tokens a gather,
the draft ids and a concatenation at the end. ``fused`` (the GPU path) does each depth's gathers, embedding and head
in one Triton kernel (``kernels.sequential_mix``) and the end in another (``kernels.tree_tokens``): a depth is
three launches (mix, projection, top-k).

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
    state_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """(..., T) long: the token of every tree node, node 0 = ``root``, written into ``out`` where given.

    hidden: (..., D) backbone state at the last accepted token. root: (...) long, the token the backbone chose after
    it; leading dimensions (none for one sequence) are a batch of rows, the heads run once for all.
    embed: token ids (n,) -> (n, D), the backbone's input embedding (read by ``sequential`` heads only).
    lm_head: the backbone's LM head (used by heads with ``lm_head="shared"``).
    draft: a draft vocabulary to propose from (None: the full vocabulary).
    fused: the Triton kernels (the decoders' GPU path; see the module docstring).
    state_row: (1,) long, one sequence only, where ``reads_state_row`` allows it: ``hidden`` is then (R, D) rows, of
    which the heads read row ``state_row`` (the decode step's prefix-layer output at the last accepted token: the
    first depth's mix kernel gathers it, so no copy of that row is launched before).
    """
    r = root.reshape(-1)  # (B,)
    if state_row is not None:
        top = _sequential_top(heads, hidden[None], r, tree, embed, lm_head, draft, fused, state_row)
        columns = tree.node_columns
    elif heads.config.kind == "medusa":
        h = hidden.reshape(-1, hidden.shape[-1])  # (B, D)
        top, columns = _parallel_top(heads, h, tree, lm_head, draft), tree.parallel_columns
    else:
        h = hidden.reshape(-1, hidden.shape[-1])  # (B, D)
        top, columns = _sequential_top(heads, h[:, None], r, tree, embed, lm_head, draft, fused), tree.node_columns
    if out is None:
        out = r.new_empty(*root.shape, tree.size)
    trees = out.view(-1, tree.size)  # (B, T): the root, then node i's column of ``top`` as a token
    if fused:
        from medusa_llama.decode.kernels import tree_tokens

        tree_tokens(r, top, columns, None if draft is None else draft.ids, trees)
    else:
        torch.cat([r[:, None], draft_tokens(top.index_select(1, columns), draft)], dim=1, out=trees)
    return out


def _parallel_top(heads: MedusaHeads, hidden: torch.Tensor, tree: Tree, lm_head, draft=None) -> torch.Tensor:
    """``medusa`` heads: one top-k list per depth; node i takes entry ``rank[i]`` of its depth's list.
    hidden (B, D) -> (B, depth * k) columns, by (depth - 1, rank): ``Tree.parallel_columns`` indexes them."""
    states = heads.chain_states(hidden)  # K x (B, D), all read h_t
    logits = torch.stack([project_draft(heads, d, states[d], lm_head, draft) for d in range(tree.max_depth)], 1)
    return topk_indices(logits, max(tree.level_topk)).flatten(1)  # from (B, depth, V|N)


def reads_state_row(heads: MedusaHeads, tree: Tree, embed, draft: DraftVocab | None, fused: bool) -> bool:
    """Whether ``propose`` can take ``state_row``: sequential heads on a static tree whose mix runs as one kernel."""
    return fused and heads.config.kind == "sequential" and tree.size > 1 and _mix_tables(embed, draft) is not None


def _sequential_top(
    heads: MedusaHeads,
    states: torch.Tensor,
    root: torch.Tensor,
    tree: Tree,
    embed,
    lm_head,
    draft,
    fused: bool,
    state_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sequential`` heads: depth by depth, each child's head reads its parent's state and its parent's token.
    states (B, 1, D), root (B,) -> (B, sum of n_d * k_d) the depths' top-k columns, row j of depth d's children at
    j * k_d ...: ``Tree.node_columns`` indexes them. ``state_row`` (1,) long: depth 0 reads ``states[:, state_row]``
    of states (B, R, D) instead (the fused path only)."""
    tables = _mix_tables(embed, draft) if fused else None
    tokens = root[:, None]  # (B, 1): depth 0 reads the root's state and token
    tops = []
    widths = [rows.numel() * k for rows, k in zip(tree.expander_rows, tree.level_topk, strict=True)]
    # fused: the depths' top-k columns written into one buffer (B, sum of widths), not concatenated after
    top = root.new_empty(root.shape[0], sum(widths)) if fused else None
    for d in range(tree.max_depth):  # one batched head call over the n_d expanders of depth d
        rows, columns = tree.expander_rows[d], tree.expander_columns[d]  # each one's parent state and token
        if d == 0 and state_row is not None:
            rows = state_row
        if tables is not None:  # the gathers, the embedding and the mix in one kernel
            states = heads.gathered_state(d, states, rows, tokens, columns, tables[min(d, 1)])
        elif d == 0:
            states = heads.head_state(0, states, embed(root)[:, None], fused)
        else:
            prev, emb = states.index_select(1, rows), draft_embed(tokens.index_select(1, columns), embed, draft)
            states = heads.head_state(d, prev, emb, fused)  # (B, n_d, D)
        logits, k = project_draft(heads, d, states, lm_head, draft), tree.level_topk[d]
        if top is not None:
            at = sum(widths[:d])
            tokens = top[:, at : at + widths[d]]  # (B, n_d * k_d)
            topk_indices(logits, k, out=tokens.view(*logits.shape[:-1], k))
        else:
            tokens = topk_indices(logits, k).flatten(1)
            tops.append(tokens)  # (B, n_d * k_d) columns: row j's children j * k_d ...
    return top if top is not None else torch.cat(tops, 1)


def plain_embedding(embed) -> bool:
    """Whether ``embed`` is a plain ``nn.Embedding`` lookup, so that a kernel may read its weight's rows instead."""
    return type(embed) is nn.Embedding and embed.max_norm is None


def _mix_tables(embed, draft: DraftVocab | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The embedding tables ``kernels.sequential_mix`` reads: the root token's (the input embedding's weight) and
    the top-k columns' (the draft vocabulary's rows, or that weight again); None where the kernel cannot read them
    (an embedding that is not a plain ``nn.Embedding`` lookup, a draft vocabulary without its rows)."""
    if not plain_embedding(embed):
        return None
    if draft is None:
        return embed.weight, embed.weight
    return None if draft.embeddings is None else (embed.weight, draft.embeddings)
