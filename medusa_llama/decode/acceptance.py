"""Acceptance rules: which path of the verified tree to keep, and the bonus token after it.

Every rule maps the verify pass to ``(path, n, bonus)``: ``path`` (D+1,) node indices root first (entries past n
are padding), ``n`` (0-d) the number of accepted candidate tokens, ``bonus`` (0-d) the backbone's own next token
after them. All are tensor-only (no host syncs), so a CUDA graph can capture a whole decode step.

- ``greedy``: accept the longest path whose every token is the backbone's argmax. Lossless: the output equals
  greedy decoding of the backbone.
- ``typical``: Medusa's typical acceptance (Cai et al., 2024, Sec. 2.3.1): accept x if
  ``p(x) > min(epsilon, delta * exp(-H(p)))``; the longest such path; bonus sampled from p. NOT lossless: the
  output distribution differs from the backbone's.
- ``sampling``: tree-aware rejection sampling, lossless for temperature > 0. At each node its children's tokens
  x_1, x_2, ... (deterministic top-k drafts) are tried in rank order; x_i is accepted with probability
  ``p(x_i) / (1 - sum_{j<i} p(x_j))`` (the residual after the rejected siblings, SpecInfer's multi-round rule
  with a point-mass draft); if all are rejected the bonus is drawn from p without them. Each emitted token is
  therefore distributed exactly as the backbone's p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medusa_llama.decode.tree import Tree

ACCEPTANCE_RULES = ("greedy", "typical", "sampling")


@dataclass(frozen=True)
class AcceptanceConfig:
    rule: str = "greedy"
    """greedy (lossless), typical (Medusa's rule, not lossless) or sampling (lossless rejection sampling)."""
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy. typical and sampling need > 0."""
    typical_epsilon: float = 0.09
    """Typical acceptance: the hard probability threshold epsilon."""
    typical_delta: float = 0.3
    """Typical acceptance: delta, the entropy-scaled threshold factor."""

    def __post_init__(self):
        if self.rule not in ACCEPTANCE_RULES:
            raise ValueError(f"--acceptance must be one of {ACCEPTANCE_RULES}, got {self.rule!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.rule in ("typical", "sampling") and self.temperature == 0:
            raise ValueError(f"--acceptance {self.rule} needs --temperature > 0 (temperature 0 is greedy)")
        if self.rule == "greedy" and self.temperature > 0:
            raise ValueError("--acceptance greedy takes --temperature 0; use --acceptance sampling to sample")


def pick(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``x[i]`` for a 0-d index tensor without a host sync (plain indexing would call ``i.item()``)."""
    return x.index_select(0, i.view(1))[0]


def sample(probs: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from (..., V) probabilities, by the Gumbel-max trick (graph-safe, no host sync).
    ``uniform`` (..., V): the uniform draws to use (drawn beforehand, e.g. outside a CUDA graph); None: fresh ones."""
    u = torch.rand_like(probs) if uniform is None else uniform
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0)))
    return (probs.clamp_min(0).log() + gumbel).argmax(-1)


def _longest_path(ok: torch.Tensor, tree: Tree) -> tuple[torch.Tensor, torch.Tensor]:
    """ok: (..., T) bool, node accepted given its parent. -> (path (..., D+1), n (...)) of the first longest
    accepted path (leading dimensions: a batch of rows, one tree)."""
    ret = tree.retrieve  # (P, D+1), -1 padded
    path_ok = ok[..., ret.clamp(min=0)] & (ret >= 0)  # (..., P, D+1)
    accepted = path_ok.long().cumprod(dim=-1).sum(dim=-1) - 1  # (..., P) accepted tokens per path, root excluded
    best = accepted.argmax(-1, keepdim=True)  # (..., 1) the first longest path
    path = ret.index_select(0, best.view(-1)).view(*best.shape[:-1], -1)  # (..., D+1); no host sync
    return path.clamp(min=0), accepted.gather(-1, best)[..., 0]


def accept_greedy(logits: torch.Tensor, tokens: torch.Tensor, tree: Tree):
    """logits: (..., T, V) float; tokens: (..., T) tree tokens. Lossless greedy acceptance."""
    pred = logits.argmax(-1)  # (..., T) the backbone's choice after each node
    ok = (tokens == pred[..., tree.parent.clamp(min=0)]) | (tree.parent < 0)  # the root is always kept
    path, n = _longest_path(ok, tree)
    return path, n, pred.gather(-1, path.gather(-1, n[..., None]))[..., 0]  # the prediction after the last node


def accept_typical(logits: torch.Tensor, tokens: torch.Tensor, tree: Tree, cfg: AcceptanceConfig):
    probs = torch.softmax(logits / cfg.temperature, dim=-1)  # (T, V)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)  # (T,)
    threshold = torch.minimum(torch.full_like(entropy, cfg.typical_epsilon), cfg.typical_delta * torch.exp(-entropy))
    parent = tree.parent.clamp(min=0)
    ok = (probs[parent, tokens] > threshold[parent]) | (tree.parent < 0)  # (T,) the root is always kept
    path, n = _longest_path(ok, tree)
    return path, n, sample(pick(probs, pick(path, n)))


def accept_sampling(logits: torch.Tensor, tokens: torch.Tensor, tree: Tree, cfg: AcceptanceConfig):
    """Lossless tree rejection sampling, vectorised over all nodes (see module docstring)."""
    t = tokens.shape[0]
    probs = torch.softmax(logits / cfg.temperature, dim=-1)  # (T, V)
    parent = tree.parent.clamp(min=0)
    p_child = probs[parent, tokens]  # (T,) p of each node's token under its parent's distribution
    idx = torch.arange(t, device=tokens.device)
    earlier_sibling = (tree.parent[:, None] == tree.parent[None, :]) & (idx[None, :] < idx[:, None])  # (T, T)
    mass_before = earlier_sibling.to(probs.dtype) @ p_child  # (T,) mass of siblings tried before
    accept_prob = p_child / (1 - mass_before).clamp_min(1e-12)
    flag = (torch.rand(t, device=tokens.device) < accept_prob) | (tree.parent < 0)  # (T,) root always kept
    # A node wins if it is accepted and no earlier sibling was; it is reached if it and all its ancestors won.
    win = flag & ((earlier_sibling.to(probs.dtype) @ flag.to(probs.dtype)) == 0)
    reached = ~(tree.mask & ~win[None, :]).any(dim=1)  # (T,)
    n = (tree.depth * reached).max()
    levels = torch.arange(tree.retrieve.shape[1], device=tokens.device)
    on_path = reached[None, :] & (tree.depth[None, :] == levels[:, None])  # (D+1, T): at most one per depth
    path = on_path.long().argmax(dim=1)  # (D+1,) padding (0) past depth n
    last = pick(path, n)
    rejected = (tree.parent == last) & (idx > 0)  # (T,) children of the last node: all were rejected
    residual = pick(probs, last).clone()  # (V,)
    drop = torch.zeros_like(residual).index_put_((tokens,), rejected.to(residual.dtype), accumulate=True) > 0
    residual = residual.masked_fill(drop, 0.0)
    return path, n, sample(residual / residual.sum())


def accept(logits: torch.Tensor, tokens: torch.Tensor, tree: Tree, cfg: AcceptanceConfig):
    """logits (..., T, V), tokens (..., T) -> path (..., D+1), n (...), bonus (...): leading dimensions are a batch of
    rows (``batch.py``). Greedy is vectorised over rows; the sampling rules run row by row (their random draws differ
    from a batch-size-1 run anyway)."""
    if cfg.rule == "greedy":
        return accept_greedy(logits, tokens, tree)
    if tokens.dim() > 1:
        picked = [accept(logits[b], tokens[b], tree, cfg) for b in range(tokens.shape[0])]
        return tuple(torch.stack(x) for x in zip(*picked, strict=True))
    if cfg.rule == "typical":
        return accept_typical(logits, tokens, tree, cfg)
    return accept_sampling(logits, tokens, tree, cfg)


def accept_into(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    tree: Tree,
    cfg: AcceptanceConfig,
    out: torch.Tensor,
    root: torch.Tensor,
    kernel: bool = False,
) -> torch.Tensor:
    """``accept`` and the step's emitted tokens at once. Writes ``out`` (..., D+2): [n, the n accepted tokens, the
    bonus token, padding (the rest of the path's tokens, then 0)], and ``root`` (...): the bonus token, the next
    tree's root; returns ``path`` (..., D+1), clamped (its entries past n: padding).

    ``kernel`` (the decoders' GPU path): greedy acceptance by two Triton kernels, the argmax's chunks
    (``kernels.argmax_keys``, which reads bf16 logits as they are; ``logits`` may be those keys already:
    ``greedy_keys``) and the acceptance that reduces them where it reads a prediction (``kernels.greedy_accept``),
    instead of the argmax and ~25 small ops; the other rules take the PyTorch ops."""
    if greedy_kernel(cfg, kernel):
        from medusa_llama.decode.kernels import greedy_accept

        return greedy_accept(greedy_keys(logits), tokens, tree.retrieve, out, root)
    path, n, bonus = accept(logits, tokens, tree, cfg)
    accepted = tokens.gather(-1, path[..., 1:])  # (..., D) the accepted candidates first ...
    torch.cat([n[..., None], accepted, torch.zeros_like(n)[..., None]], dim=-1, out=out)  # (..., D+2)
    out.scatter_(-1, (n + 1)[..., None], bonus[..., None])  # ... then the bonus token after them
    root.copy_(bonus)
    return path


FUSED_ACCEPT = True
"""A Medusa step of one sequence on the GPU path, greedy, with the fused prefix extend (``decoder.MedusaDecoder``)
takes ``accept_move_into``: the acceptance, the commit's KV move and the prefix layer's inputs in one launch (three
before: two fewer a step). False: ``accept_into``, then the commit's move and ``PrefixCache.extend_path``'s inputs by
their own launches (the reference; ``benchmarks/step_profile.py --set acceptance.FUSED_ACCEPT=False`` A/Bs it)."""


def accept_move_into(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    tree: Tree,
    out: torch.Tensor,
    root: torch.Tensor,
    caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    hidden: torch.Tensor,
    table: torch.Tensor | None,
    rope: torch.Tensor,
    length: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``accept_into``'s greedy kernels for one sequence, with the work that follows in the acceptance's launch
    (``kernels.accept_move``): the accepted path's K/V moved into place in ``caches`` = (k_cache, v_cache,
    cache_len), the backbone's, whose length the caller then advances by ``out[0] + 1`` (a commit of the root
    alone), and the prefix layer's inputs for ``PrefixCache.extend_path`` made from ``hidden`` (T, D), ``table`` and
    ``rope``, the prefix cache's length advanced. ``logits``: the LM head's (T, V), or their keys (``greedy_keys``).
    Returns the path (D+1,), clamped, and those inputs."""
    from medusa_llama.decode.kernels import accept_move

    keys = greedy_keys(logits)
    path, *inputs = accept_move(keys, tokens, tree.retrieve, out, root, *caches, hidden, table, rope, length)
    return path, tuple(inputs)


def greedy_kernel(cfg: AcceptanceConfig, kernel: bool) -> bool:
    """Whether a step on the GPU path (``kernel``) takes the greedy rule's Triton kernels: they read the LM head's
    logits in its own dtype (``Backbone.logits(..., float32=False)``: no cast), the other rules fp32 logits."""
    return kernel and cfg.rule == "greedy"


def greedy_keys(logits: torch.Tensor) -> torch.Tensor:
    """The argmax keys the greedy kernels reduce (``kernels.argmax_keys``' format: (..., C) int64) of what a greedy
    step on the GPU path took from the LM head (``Backbone.greedy_logits``): its logits (..., V), keyed here by
    ``argmax_keys``, or already their keys (int64, (..., 1): ``lm_head.argmax_linear`` made them in the LM head's
    launch, ``lm_head.FUSED_ARGMAX``)."""
    if logits.dtype == torch.int64:
        return logits
    from medusa_llama.decode.kernels import argmax_keys

    return argmax_keys(logits)


def next_token_into(
    logits: torch.Tensor, cfg: AcceptanceConfig, root: torch.Tensor, out: torch.Tensor, kernel: bool = False
) -> None:
    """``next_token`` written into ``root`` (...) and ``out[..., 1]`` (the vanilla step's [n = 0, token]). On the GPU
    path at temperature 0 (``kernel``): two Triton launches (``kernels.argmax_keys``, ``kernels.greedy_token``)
    instead of ``torch.argmax``, a single-block reduction (13 us for a row of 49152 on an H200), and two copies; one
    where ``logits`` are their keys already (``greedy_keys``)."""
    if greedy_kernel(cfg, kernel):
        from medusa_llama.decode.kernels import greedy_token

        greedy_token(greedy_keys(logits), root, out)
        return
    token = next_token(logits, cfg)
    root.copy_(token)
    out[..., 1].copy_(token)


def next_token(logits: torch.Tensor, cfg: AcceptanceConfig, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """The vanilla decoder's rule: argmax at temperature 0, else a draw from softmax(logits / T) (by ``uniform``,
    shaped like ``logits``, where given: see ``sample``)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return sample(torch.softmax(logits / cfg.temperature, dim=-1), uniform)
