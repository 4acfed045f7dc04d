"""Medusa heads: extra decoding heads on a frozen backbone's last hidden state.

Head k (1-based) reads the backbone's final normalized hidden state h_t and predicts token t+k+1;
the base LM head predicts t+1 (Cai et al., 2024, "Medusa", arXiv:2401.10774, Sec. 2.1.1).

Two kinds share one interface:
- ``medusa``: the paper's heads. Head k is ``L`` residual blocks ``x + SiLU(W x + b)`` on h_t, then a vocab
  projection; all heads run at once.
- ``sequential``: head k also reads the embedding of the token before it on the candidate path:
  ``s_k = s_{k-1} + SiLU(A_k s_{k-1} + B_k e(x_{t+k}) + b_k)`` with ``s_0 = h_t`` (then ``L - 1`` more residual
  blocks), so deeper heads know which branch they extend. It measured clearly better on SmolLM2 (FACTS.md).

The vocab projection is either the backbone's own LM head, shared and frozen (``lm_head="shared"``, small
checkpoints), or a trainable copy per head (``lm_head="own"``, the Medusa-1 format).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medusa_llama.errors import MedusaError

HEAD_KINDS = ("medusa", "sequential")
LM_HEAD_MODES = ("shared", "own")
WEIGHTS_NAME = "medusa_heads.safetensors"
CONFIG_NAME = "config.json"


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

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"--head-kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"--lm-head must be one of {LM_HEAD_MODES}, got {self.lm_head!r}")
        if self.num_heads < 1:
            raise ValueError(f"--num-heads must be >= 1, got {self.num_heads}")
        if self.num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {self.num_layers}")


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

    def forward(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return s + F.silu(self.state(s) + self.token(e))


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

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

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

    def head_state(self, k: int, prev: torch.Tensor, token_emb: torch.Tensor | None = None) -> torch.Tensor:
        """One head's state. medusa: ``prev`` is h_t. sequential: ``prev`` is s_{k-1}, ``token_emb`` e(x_{t+k})."""
        if self.config.kind == "sequential":
            prev = self.mix[k](prev, token_emb.to(prev.dtype))
        return self.blocks[k](prev)

    def chain_states(self, hidden: torch.Tensor, path_emb: torch.Tensor | None = None) -> list[torch.Tensor]:
        """States of all K heads along one path per position (training and chain decoding).

        hidden: (..., D) backbone states h_t. path_emb: (K, ..., D) for sequential heads, path_emb[k] being the
        embedding of x_{t+k+1} (teacher forcing: the true next tokens). Returns K tensors (..., D).
        """
        states, s = [], hidden
        for k in range(self.num_heads):
            if self.config.kind == "sequential":
                s = self.head_state(k, s, path_emb[k])
                states.append(s)
            else:
                states.append(self.head_state(k, hidden))
        return states

    # -- proposal -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, hidden: torch.Tensor, root: torch.Tensor, tree, embed, lm_head) -> torch.Tensor:
        """Fill a candidate tree: (T,) token per node, node 0 = ``root``. Fixed shapes, no host syncs.

        hidden: (D,) backbone state at the last accepted token; root: 0-d, the token the backbone chose after it.
        ``medusa`` heads run once on h_t; a node at depth d holds head d's rank-r token. ``sequential`` heads expand
        the tree depth by depth: one batched head call per depth over the nodes that have children there.
        """
        tokens = root.new_zeros(tree.size)  # (T,)
        tokens[0] = root
        if self.config.kind == "medusa":
            states = torch.stack(self.chain_states(hidden))  # (K, D)
            k = max(tree.level_topk)
            top = torch.stack([self.project(i, states[i], lm_head) for i in range(len(tree.level_topk))])  # (D, V)
            top = top.topk(k, dim=-1).indices  # (D_tree, k)
            tokens[1:] = top[tree.depth[1:] - 1, tree.rank[1:]]
            return tokens
        prev = hidden[None]  # (1, D): the state the root's children are predicted from
        for d, nodes in enumerate(tree.expanders):  # nodes: (n_d,) nodes at depth d with children
            parent_rows = tree.child_slot[nodes] if d > 0 else torch.zeros_like(nodes)
            state = self.head_state(d, prev[parent_rows], embed(tokens[nodes]))  # (n_d, D)
            top = self.project(d, state, lm_head).topk(tree.level_topk[d], dim=-1).indices  # (n_d, k_d)
            lo, hi = tree.levels[d + 1]
            tokens[lo:hi] = top[tree.child_slot[lo:hi], tree.rank[lo:hi]]
            prev = state
        return tokens

    # -- persistence ---------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write ``medusa_heads.safetensors`` + ``config.json`` into ``directory`` (atomically per file)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.trainable_state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, tmp, metadata={"format": "pt"})
        tmp.replace(directory / WEIGHTS_NAME)
        tmp = directory / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps({"model_type": "medusa-llama-heads", **asdict(self.config)}, indent=2))
        tmp.replace(directory / CONFIG_NAME)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """Load heads from a directory (or its weights file). Errors are one line: ``MedusaError``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        directory = path.parent if path.is_file() else path
        weights = path if path.is_file() else directory / WEIGHTS_NAME
        if not weights.is_file() and path.suffix == ".pt":
            raise MedusaError(f"heads file not found: {path}")
        if not (directory / CONFIG_NAME).is_file() or not weights.is_file():
            raise MedusaError(f"{path} holds no Medusa heads ({WEIGHTS_NAME} + {CONFIG_NAME} expected)")
        try:
            raw = json.loads((directory / CONFIG_NAME).read_text())
            raw.pop("model_type", None)
            config = HeadsConfig(**raw)
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise MedusaError(f"corrupt heads config {directory / CONFIG_NAME}: {exc}") from exc
        try:
            if weights.suffix == ".pt":
                state = torch.load(weights, map_location="cpu", weights_only=True)
            else:
                state = load_file(weights)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise MedusaError(f"corrupt heads checkpoint {weights}: {str(exc).splitlines()[0]}") from exc
        heads = cls(config)
        missing, unexpected = heads.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MedusaError(
                f"heads checkpoint {weights} does not match its config: missing {list(missing)[:3]}, "
                f"unexpected {list(unexpected)[:3]}"
            )
        return heads.to(device=device, dtype=dtype).eval()

    def check_compatible(self, hidden_size: int, vocab_size: int, base_model: str | None = None) -> None:
        """Raise ``MedusaError`` if these heads were not made for this backbone."""
        c = self.config
        if c.hidden_size != hidden_size or c.vocab_size != vocab_size:
            raise MedusaError(
                f"heads were trained for hidden size {c.hidden_size} / vocab {c.vocab_size} ({c.base_model or '?'}), "
                f"but the model has hidden size {hidden_size} / vocab {vocab_size}"
            )
        if base_model and c.base_model and c.base_model != base_model:
            raise MedusaError(f"heads were trained on {c.base_model!r}, not on {base_model!r}")
