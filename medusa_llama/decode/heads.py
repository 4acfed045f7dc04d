"""Medusa heads: extra decoding heads on a frozen backbone's last hidden state.

Head k (1-based) reads the backbone's final normalized hidden state h_t and predicts token t+k+1;
the base LM head predicts t+1 (Cai et al., 2024, "Medusa", arXiv:2401.10774, Sec. 2.1.1).

Two kinds share one interface:
- ``medusa``: the paper's heads. Head k is ``L`` residual blocks ``x + SiLU(W x + b)`` on h_t, then a vocab
  projection; all heads run at once.
- ``sequential``: head k also reads the embedding of the token before it on the candidate path:
  ``s_k = s_{k-1} + SiLU(A_k s_{k-1} + B_k e(x_{t+k}) + b_k)`` with ``s_0 = h_t`` (then ``L - 1`` more residual
  blocks), so deeper heads know which branch they extend. It measured clearly better on SmolLM2 (FACTS.md).

With ``prefix_attention`` (Hydra++, ``prefix.py``) either kind reads, instead of h_t, the output at t of one extra
decoder layer over h_0 .. h_t: training runs it over the block (``head_inputs``), decoding keeps its KV cache.
``prefix_token_input`` adds EAGLE's draft input to that layer (Li et al., 2024, "EAGLE: Speculative Sampling Requires
Rethinking Feature Uncertainty", arXiv:2401.15077): at position i it reads h_i + W_tok e(x_{i+1}), the embedding of
the token actually chosen after i through a zero-initialised projection, so the layer knows the sampled token, not
only the feature that led to it.

The vocab projection is either the backbone's own LM head, shared and frozen (``lm_head="shared"``, small
checkpoints), or a trainable copy per head (``lm_head="own"``, the Medusa-1 format).

A draft vocabulary (FR-Spec: Zhao et al., 2025, "FR-Spec: Accelerating Large-Vocabulary Language Models via
Frequency-Ranked Speculative Sampling", arXiv:2502.14856) restricts the heads' proposals to N frequent tokens:
``DraftVocab`` holds the N rows of the vocab projection, taken once, so each depth's projection and top-k run over
N columns instead of V. Verification still uses the full vocabulary, so decoding stays lossless; only a true next
token outside the N cannot be proposed. ``project_draft`` / ``draft_topk`` are the one place proposals project.

This file holds the modules only: proposal (filling a candidate tree) is ``proposal.py``, files ``heads_io.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medusa_llama.decode.model import add_linear
from medusa_llama.decode.prefix import PrefixLayer
from medusa_llama.decode.topk import topk_indices
from medusa_llama.errors import MedusaError

HEAD_KINDS = ("medusa", "sequential")
LM_HEAD_MODES = ("shared", "own")
WEIGHTS_NAME = "medusa_heads.safetensors"
CONFIG_NAME = "config.json"
DRAFT_VOCAB_NAME = "draft_vocab.safetensors"
"""Optional, beside the weights: one (N,) integer tensor ``token_ids``, the draft vocabulary, most frequent first."""


@dataclass
class HeadsConfig:
    num_heads: int = 4
    """K: head k predicts token t+k+1."""
    num_layers: int = 1
    """Residual blocks per head."""
    hidden_size: int = 576
    """The backbone's hidden size."""
    vocab_size: int = 49152
    """The backbone's vocabulary size."""
    kind: str = "sequential"
    """``medusa`` (hidden state only) or ``sequential`` (hidden state + previous token on the path)."""
    lm_head: str = "shared"
    """``shared``: the backbone's frozen LM head; ``own``: a trainable copy per head."""
    base_model: str = ""
    """Name of the backbone the heads were trained on (checked on load)."""
    prefix_attention: bool = False
    """Hydra++ prefix attention: the heads read one extra decoder layer's output over h_0 .. h_t instead of h_t."""
    prefix_num_heads: int = 9
    """Attention heads of the prefix layer (the backbone's count)."""
    prefix_intermediate_size: int | None = None
    """The prefix layer's SwiGLU width (None: 2 x hidden size)."""
    rope_theta: float = 10000.0
    """RoPE base of the prefix layer (the backbone's)."""
    prefix_token_input: bool = False
    """EAGLE-style token input of the prefix layer: at position i it reads h_i + W_tok e(x_{i+1}) (needs
    ``prefix_attention``; configs written before the option load as False)."""

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"--head-kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"--lm-head must be one of {LM_HEAD_MODES}, got {self.lm_head!r}")
        if self.num_heads < 1:
            raise ValueError(f"--num-heads must be >= 1, got {self.num_heads}")
        if self.num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {self.num_layers}")
        if self.prefix_attention and (self.prefix_num_heads < 1 or self.hidden_size % self.prefix_num_heads):
            raise ValueError(
                f"prefix_num_heads must divide the hidden size {self.hidden_size}, got {self.prefix_num_heads}"
            )
        if self.prefix_token_input and not self.prefix_attention:
            raise ValueError("--prefix-token-input needs --prefix-attention (it is an input of the prefix layer)")


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``; W and b start at zero so a fresh head is the identity on h_t."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)  # identity at start: the head begins as the base LM head
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class SequentialBlock(nn.Module):
    """``s + SiLU(A s + B e)``: mixes the running state with the embedding of the previous path token."""

    def __init__(self, dim: int):
        super().__init__()
        self.state = nn.Linear(dim, dim)
        self.token = nn.Linear(dim, dim, bias=False)
        for lin in (self.state, self.token):
            nn.init.zeros_(lin.weight)  # identity at start, like ResBlock
        nn.init.zeros_(self.state.bias)

    def forward(self, s: torch.Tensor, e: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """s, e: (..., D). ``fused`` (inference on a GPU): ``s + SiLU(.)`` by one Triton kernel instead of two ops.

        ``B e`` accumulates onto ``A s + b`` in the second GEMM (addmm) instead of a third op adding them."""
        z = add_linear(self.state(s), e, self.token)  # (..., D)
        if fused:
            from medusa_llama.decode.kernels import silu_residual

            return silu_residual(z, s)
        return s + F.silu(z)

    def gathered(
        self, states: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, columns: torch.Tensor, table: torch.Tensor
    ) -> torch.Tensor:
        """``forward(states[:, rows], table[tokens[:, columns]])`` by one Triton kernel (``kernels.sequential_mix``,
        inference on a GPU): states (B, S, D), tokens (B, C) long, rows and columns (N,) long, table (V, D) ->
        (B, N, D)."""
        from medusa_llama.decode.kernels import sequential_mix

        lin = self.state
        return sequential_mix(states, rows, tokens, columns, table, lin.weight, lin.bias, self.token.weight)


class MedusaHeads(nn.Module):
    """K heads over a backbone's hidden states. See the module docstring for the two kinds."""

    def __init__(self, config: HeadsConfig, base_lm_head: nn.Module | None = None):
        super().__init__()
        self.config = config
        d, k, n = config.hidden_size, config.num_heads, config.num_layers
        if config.kind == "sequential":
            self.mix = nn.ModuleList(SequentialBlock(d) for _ in range(k))
            self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(d) for _ in range(n - 1))) for _ in range(k))
        else:
            self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(d) for _ in range(n))) for _ in range(k))
        if config.lm_head == "own":
            self.lm_heads = nn.ModuleList(nn.Linear(d, config.vocab_size, bias=False) for _ in range(k))
            if base_lm_head is not None:
                self.init_lm_heads_from(base_lm_head)
        else:
            self.lm_heads = None
        self.draft_vocab: torch.Tensor | None = None  # (N,) long token ids, most frequent first (heads_io loads it)
        self.prefix = None
        if config.prefix_attention:
            width = config.prefix_intermediate_size or 2 * d
            self.prefix = PrefixLayer(
                d, config.prefix_num_heads, width, config.rope_theta, token_input=config.prefix_token_input
            )

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def head_inputs(self, hidden: torch.Tensor, next_emb: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' input states over whole sequences (B, L, D) from position 0: h_t, or the prefix layer's output.

        next_emb: (B, L, D), e(x_{t+1}) at each position t, read only by a prefix layer with the token input
        (``config.prefix_token_input``), which requires it; where x_{t+1} is unknown (past the end) any token's
        embedding does for positions whose outputs are not used (causal: no other position reads it)."""
        return hidden if self.prefix is None else self.prefix(hidden, next_emb)

    def init_lm_heads_from(self, base_lm_head: nn.Module) -> None:
        """Start every own LM head as a copy of the base LM head (so head k starts as the base prediction)."""
        if self.lm_heads is not None:
            with torch.no_grad():
                for lin in self.lm_heads:
                    lin.weight.copy_(base_lm_head.weight.to(lin.weight.dtype))

    def project(self, k: int, state: torch.Tensor, base_lm_head: nn.Module) -> torch.Tensor:
        """Logits of head ``k`` (0-based) from its final state: (..., D) -> (..., V)."""
        if self.lm_heads is not None:
            return self.lm_heads[k](state)
        return base_lm_head(state.to(base_lm_head.weight.dtype))

    def head_state(
        self, k: int, prev: torch.Tensor, token_emb: torch.Tensor | None = None, fused: bool = False
    ) -> torch.Tensor:
        """One head's state. medusa: ``prev`` is h_t. sequential: ``prev`` is s_{k-1}, ``token_emb`` e(x_{t+k}).
        ``fused``: the sequential mix's Triton kernel (inference on a GPU: ``SequentialBlock``)."""
        if self.config.kind == "sequential":
            prev = self.mix[k](prev, token_emb.to(prev.dtype), fused)
        return self.blocks[k](prev)

    def gathered_state(
        self, k: int, states: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, columns: torch.Tensor, table
    ) -> torch.Tensor:
        """Sequential head ``k``'s state over gathered inputs, its mix by one kernel (``SequentialBlock.gathered``):
        ``head_state(k, states[:, rows], table[tokens[:, columns]])``, (B, N, D)."""
        return self.blocks[k](self.mix[k].gathered(states, rows, tokens, columns, table))

    def chain_states(self, hidden: torch.Tensor, path_emb: torch.Tensor | None = None) -> list[torch.Tensor]:
        """States of all K heads along one path per position (training and chain decoding).

        hidden: (..., D) input states (h_t, or the prefix layer's output: ``head_inputs``). path_emb: (K, ..., D) for
        sequential heads, path_emb[k] being the embedding of x_{t+k+1} (teacher forcing: the true next tokens).
        Returns K tensors (..., D).
        """
        states, s = [], hidden
        for k in range(self.num_heads):
            if self.config.kind == "sequential":
                s = self.head_state(k, s, path_emb[k])
                states.append(s)
            else:
                states.append(self.head_state(k, hidden))
        return states

    def draft(self, lm_head: nn.Module, size: int | None = None, embed: nn.Module | None = None) -> DraftVocab | None:
        """The draft vocabulary to propose from: the stored one (``size`` None), its first ``size`` tokens, or none
        (``size`` 0, or None without a stored one). Raises ``MedusaError`` for a size the heads cannot give.
        ``embed``: the backbone's input embedding, whose draft rows sequential heads read (``DraftVocab.embeddings``).
        """
        if size == 0 or (size is None and self.draft_vocab is None):
            return None
        if self.draft_vocab is None:
            raise MedusaError(
                f"--draft-vocab {size}: these heads have no {DRAFT_VOCAB_NAME} (`medusa-llama draft-vocab` makes one)"
            )
        stored = self.draft_vocab.numel()
        if size is not None and not 0 < size <= stored:
            raise MedusaError(f"--draft-vocab must be 0 (off) or 1 .. {stored} (the stored vocabulary), got {size}")
        return DraftVocab.build(self, lm_head, self.draft_vocab[:size], embed)

    # -- persistence: thin wrappers over heads_io (kept because many callers use them) ----------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write ``medusa_heads.safetensors`` + ``config.json`` into ``directory``: ``heads_io.save_heads``."""
        from medusa_llama.decode.heads_io import save_heads

        save_heads(self, directory, dtype)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
        """Load heads in our, the FasterDecoding or the vLLM format: ``heads_io.load_heads``."""
        from medusa_llama.decode.heads_io import load_heads

        return load_heads(path, device, dtype)

    def check_compatible(self, hidden_size: int, vocab_size: int, base_model: str | None = None) -> None:
        """Raise ``MedusaError`` if these heads were not made for this backbone: ``heads_io.check_compatible``."""
        from medusa_llama.decode.heads_io import check_compatible

        check_compatible(self.config, hidden_size, vocab_size, base_model)


@dataclass(frozen=True)
class DraftVocab:
    """The heads' vocab projection restricted to N tokens (FR-Spec, see the module docstring). Frozen tensors."""

    ids: torch.Tensor
    """(N,) long: the token id of each column of the restricted logits."""
    projections: tuple[nn.Module, ...]
    """Linear maps D -> N: the shared LM head's rows ``W[ids]`` (one), or each own LM head's rows (K)."""
    embeddings: torch.Tensor | None = None
    """(N, D): the input embedding of each column's token, for sequential heads (their next depth reads the chosen
    columns' embeddings in one gather instead of mapping columns to ids first); None where not built."""

    @classmethod
    @torch.no_grad()
    def build(cls, heads: MedusaHeads, lm_head: nn.Module, ids: torch.Tensor, embed: nn.Module | None = None):
        """Take the rows once: ``W_sub = W[ids]`` (N, D) per projection, on the weights' device and dtype, and with
        ``embed`` (sequential heads) the N embedding rows (N D more weights: 9 MB for SmolLM2 in bf16)."""
        sources = list(heads.lm_heads) if heads.lm_heads is not None else [lm_head]
        ids = ids.to(device=sources[0].weight.device, dtype=torch.long)
        rows = embed(ids) if embed is not None and heads.config.kind == "sequential" else None  # (N, D)
        return cls(ids, tuple(_rows_of(src, ids) for src in sources), rows)

    @property
    def size(self) -> int:
        return int(self.ids.numel())


def _rows_of(linear: nn.Module, ids: torch.Tensor) -> nn.Module:
    """A bias-free linear whose weight is ``linear.weight[ids]`` (N, D); prepacked for oneDNN like ``linear`` was."""
    from medusa_llama.decode.cpu_linear import PackedLinear, pack_for_cpu

    w = linear.weight
    sub = nn.Linear(w.shape[1], ids.numel(), bias=False, device=w.device, dtype=w.dtype)
    sub.weight.copy_(w[ids])  # (N, D)
    sub.requires_grad_(False)
    if getattr(linear, "bias", None) is not None:  # no Llama LM head has one; kept exact all the same
        sub.bias = nn.Parameter(linear.bias.detach()[ids], requires_grad=False)
    return pack_for_cpu(sub) if isinstance(linear, PackedLinear) else sub


def project_draft(
    heads: MedusaHeads, k: int, state: torch.Tensor, lm_head: nn.Module, draft: DraftVocab | None = None
) -> torch.Tensor:
    """Head ``k``'s proposal logits: (..., D) -> (..., V), or (..., N) over the draft vocabulary's columns."""
    if draft is None:
        return heads.project(k, state, lm_head)
    proj = draft.projections[k if len(draft.projections) > 1 else 0]
    return proj(state.to(proj.weight.dtype))


def draft_tokens(columns: torch.Tensor, draft: DraftVocab | None = None) -> torch.Tensor:
    """Token ids of columns of ``project_draft``'s logits (the identity without a draft vocabulary)."""
    return columns if draft is None else draft.ids[columns]


def draft_embed(columns: torch.Tensor, embed, draft: DraftVocab | None = None) -> torch.Tensor:
    """(..., D): the input embeddings of the tokens of ``project_draft``'s columns (...,) (token ids without a draft
    vocabulary); one gather where the draft vocabulary holds its rows."""
    if draft is not None and draft.embeddings is not None:
        return F.embedding(columns, draft.embeddings)
    return embed(draft_tokens(columns, draft))


def draft_topk(
    heads: MedusaHeads, k: int, state: torch.Tensor, lm_head: nn.Module, topk: int, draft: DraftVocab | None = None
) -> torch.Tensor:
    """(..., topk) long: head ``k``'s ``topk`` best token ids from its state (..., D), best first."""
    columns = topk_indices(project_draft(heads, k, state, lm_head, draft), topk)  # (..., topk)
    return draft_tokens(columns, draft)
