"""The Medusa training objective: heads loss (hard CE or self-distilled KL), LM-head KL to the frozen teacher.

Indexing (Cai et al. 2024, Sec. 2.2, with 0-based heads): for input x_0..x_{T-1} and backbone state h_t,

    head k at position t predicts x_{t+k+2}     (the LM head predicts x_{t+1}; 1-based head k: x_{t+k+1})
    its loss is masked by the loss mask of x_{t+k+2} and weighted lambda^k
    soft target (self-distillation): the teacher's next-token distribution at position t+k+1
    sequential heads are teacher forced: head k reads e(x_{t+k+1}) (``MedusaHeads.chain_states``)
    with prefix attention the heads read the prefix layer's output over the block instead of h_t (the soft
    targets still come from the backbone's own states); with its token input (EAGLE-style) the layer reads
    h_t + W_tok e(x_{t+1}), the block's next token (``next_embeddings``)

Medusa-1 (``joint=False``): the backbone runs under ``no_grad`` and only the heads learn. Medusa-2
(``joint=True``): LoRA adapters learn too; the LM head's loss is KL(teacher || student), the teacher being the
same model with adapters disabled (one model in memory), so the backbone keeps its own distribution.

Logits are never materialised for all positions: per head, positions are processed in chunks and each chunk
is checkpointed, so backward recomputes one (chunk, V) block at a time (a 49k vocab x 4 heads x 16 x 512 tokens
would otherwise hold ~6 GB of fp32 logits and as much again for their gradients).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medusa_llama.decode.heads import MedusaHeads

TOPK = 5


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The backbone's final normalized hidden states (B, T, D). Blocks are right padded: no attention mask needed."""
    decoder = causal_lm(model).get_decoder()
    return decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, D)


def teacher_context(model: nn.Module):
    """Adapters off (the frozen base model) when the model is a peft model; nothing to do otherwise."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _chunk_divergence(
    logits_fn, state: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor | None, lm_head
) -> torch.Tensor:
    """Weighted loss sum over one chunk: CE to ``target`` or, with teacher states, KL(teacher || logits_fn(state))."""
    logp = F.log_softmax(logits_fn(state).float(), dim=-1)  # (n, V)
    if teacher is None:
        loss = F.nll_loss(logp, target, reduction="none")  # (n,)
    else:
        t_logp = F.log_softmax(lm_head(teacher.to(lm_head.weight.dtype)).float(), dim=-1)  # (n, V)
        loss = (t_logp.exp() * (t_logp - logp)).sum(-1)  # (n,)
    return (loss * weight).sum()


def chunked_loss(
    logits_fn, state, target, weight, teacher, lm_head, chunk: int, grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted losses, sum of weights) over rows of state (N, D) processed ``chunk`` rows at a time."""
    total = state.new_zeros((), dtype=torch.float32)
    for i in range(0, state.shape[0], chunk):
        args = (state[i : i + chunk], None if target is None else target[i : i + chunk], weight[i : i + chunk])
        t = None if teacher is None else teacher[i : i + chunk]
        if grad:
            total = total + checkpoint(_chunk_divergence, logits_fn, *args, t, lm_head, use_reentrant=False)
        else:
            total = total + _chunk_divergence(logits_fn, *args, t, lm_head)
    return total, weight.sum()


@torch.no_grad()
def topk_correct(logits_fn, state, target, weight, chunk: int) -> torch.Tensor:
    """Weighted counts of target in the top-1 and top-5 predictions: (2,)."""
    counts = state.new_zeros(2, dtype=torch.float32)
    for i in range(0, state.shape[0], chunk):
        top = logits_fn(state[i : i + chunk]).topk(TOPK, dim=-1).indices  # (n, 5)
        hit = top == target[i : i + chunk, None]  # (n, 5)
        w = weight[i : i + chunk]
        counts[0] += (hit[:, 0].float() * w).sum()
        counts[1] += (hit.any(-1).float() * w).sum()
    return counts


class MedusaObjective(nn.Module):
    """Backbone (optionally peft-wrapped) + heads -> losses. One module so DDP sees every trainable tensor."""

    def __init__(
        self,
        model: nn.Module,
        heads: MedusaHeads,
        lambda_decay: float = 0.8,
        soft_targets: bool = False,
        lm_loss_weight: float = 1.0,
        chunk_tokens: int = 2048,
    ):
        super().__init__()
        self.model, self.heads = model, heads
        self.lambda_decay, self.soft_targets = lambda_decay, soft_targets
        self.lm_loss_weight, self.chunk_tokens = lm_loss_weight, chunk_tokens

    @property
    def lm_head(self) -> nn.Module:
        return causal_lm(self.model).get_output_embeddings()

    def embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, D): the backbone's (frozen) input embeddings of the block."""
        with torch.no_grad():
            return causal_lm(self.model).get_input_embeddings()(input_ids)

    def path_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """(K, B, T, D) from the block's embeddings (B, T, D): entry k at t is e(x_{t+k+1}), zeros past the end (those
        positions carry no loss)."""
        K, (B, T, D) = self.heads.num_heads, emb.shape
        padded = torch.cat([emb, emb.new_zeros(B, K, D)], dim=1)  # (B, T+K, D)
        return torch.stack([padded[:, k + 1 : k + 1 + T] for k in range(K)])  # (K, B, T, D)

    @staticmethod
    def next_embeddings(emb: torch.Tensor) -> torch.Tensor:
        """(B, T, D): e(x_{t+1}) at each position t, the prefix layer's token input. The block's last position has no
        next token in the block: it reads its own token's embedding (any token would do). Its output reaches no
        loss: head k's targets x_{t+k+2} stop at the block's end (``forward`` scores positions t < T-k-2 only), and
        the layer is causal, so no other position reads it."""
        return torch.cat([emb[:, 1:], emb[:, -1:]], dim=1)  # (B, T, D)

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, joint: bool = False, metrics: bool = False):
        """input_ids (B, T) int64, loss_mask (B, T) float (1 = learn token). Returns a dict of tensors:

        loss (), head_loss (K,), lm_kl (); with ``metrics`` also head_correct (K, 2) and head_count (K,).
        """
        grad = torch.is_grad_enabled()
        teacher_hidden = None
        if joint:
            with torch.no_grad(), teacher_context(self.model):
                teacher_hidden = final_hidden(self.model, input_ids)  # (B, T, D), adapters off
            hidden = final_hidden(self.model, input_ids)  # (B, T, D), student
        else:
            with torch.no_grad():
                hidden = final_hidden(self.model, input_ids)  # (B, T, D)
            teacher_hidden = hidden
        B, T, D = hidden.shape
        dtype = next(self.heads.parameters()).dtype  # fp32 heads on a bf16 backbone (autocast or not)
        c = self.heads.config
        emb = self.embeddings(input_ids).to(dtype) if c.kind == "sequential" or c.prefix_token_input else None
        path_emb = self.path_embeddings(emb) if c.kind == "sequential" else None
        next_emb = self.next_embeddings(emb) if c.prefix_token_input else None
        states = self.heads.chain_states(self.heads.head_inputs(hidden.to(dtype), next_emb), path_emb)  # K x (B,T,D)
        lm_head = self.lm_head
        out = {"head_loss": [], "head_correct": [], "head_count": []}
        loss = hidden.new_zeros((), dtype=torch.float32)
        for k, state in enumerate(states):
            n = T - k - 2  # positions with a target
            if n <= 0:
                raise ValueError(f"--block-size {T} is too short for {len(states)} heads")
            s = state[:, :n].reshape(B * n, D)  # (B*n, D)
            target = input_ids[:, k + 2 :].reshape(B * n)  # (B*n,) x_{t+k+2}
            weight = loss_mask[:, k + 2 :].reshape(B * n)  # (B*n,)
            teacher = teacher_hidden[:, k + 1 : k + 1 + n].reshape(B * n, D) if self.soft_targets else None

            def logits_fn(x, k=k):
                return self.heads.project(k, x, lm_head)

            total, count = chunked_loss(logits_fn, s, target, weight, teacher, lm_head, self.chunk_tokens, grad)
            head_loss = total / count.clamp(min=1)
            loss = loss + self.lambda_decay**k * head_loss
            out["head_loss"].append(head_loss.detach())
            if metrics:
                out["head_correct"].append(topk_correct(logits_fn, s.detach(), target, weight, self.chunk_tokens))
                out["head_count"].append(count.detach())
        lm_kl = loss.new_zeros(())
        if joint:
            s = hidden[:, :-1].reshape(B * (T - 1), D)  # (B*(T-1), D) student states predicting x_{t+1}
            teacher = teacher_hidden[:, :-1].reshape(B * (T - 1), D)
            weight = loss_mask[:, 1:].reshape(B * (T - 1))

            def student_fn(x):
                return lm_head(x.to(lm_head.weight.dtype))

            total, count = chunked_loss(student_fn, s, None, weight, teacher, lm_head, self.chunk_tokens, grad)
            lm_kl = total / count.clamp(min=1)
            loss = loss + self.lm_loss_weight * lm_kl
        out = {k: torch.stack(v) for k, v in out.items() if v}
        out["loss"], out["lm_kl"] = loss, lm_kl.detach()
        return out
