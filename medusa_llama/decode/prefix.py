"""Prefix attention: one extra decoder layer over the backbone's final hidden states, feeding the heads.

Hydra++ (Ankner et al., 2024, "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding", arXiv:2402.05109,
Sec. 4.2 "prefix attention") adds one Llama-style decoder layer, with its own KV cache, over the base model's last
hidden states h_0 .. h_t; its output at t (instead of h_t) is what the heads read. The heads then see the whole
prefix through a layer trained for drafting, not only the one state the base model shaped for its own next token.

The layer: ``x + Attn(RMSNorm(x))`` (causal, RoPE at absolute token positions, as many heads as the backbone), then
``x + SwiGLU(RMSNorm(x))``. ``o_proj`` and ``down_proj`` start at zero, so a fresh layer is exactly the identity and
fresh prefix heads propose exactly what heads without it would.

Two forms compute the same function (``tests/decode/test_prefix.py``):
- training: ``PrefixLayer.forward(hidden)`` over a whole block (B, L, D), positions 0 .. L-1;
- decoding: ``PrefixCache.extend(hidden, count)`` appends rows to a static KV cache owned by the decoder, tensor-only
  with the cache length in a device tensor, so a decode step that extends it stays one CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medusa_llama.decode.model import sdpa

NORM_EPS = 1e-6
KERNEL_MAX_ROWS = 128
"""Decode-step extends of at most this many rows go through the Triton kernel (its tuned range of tree sizes)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PrefixLayer(nn.Module):
    """A Llama decoder layer (MHA, no GQA) over hidden states; the identity when fresh. See the module docstring."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, rope_theta: float):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_theta = num_heads, dim // num_heads, rope_theta
        self.attn_norm = RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.mlp_norm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, dim, bias=False)
        for lin in (self.o_proj, self.down_proj):
            nn.init.zeros_(lin.weight)  # both residual branches add zero: a fresh layer is the identity

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (..., L, 1, hd) for positions (..., L); computed in fp32 (theta^(-2i/hd) in bf16 is too coarse)."""
        inv_freq = self.rope_theta ** -(
            torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        )  # (hd/2,)
        freqs = positions.float()[..., None] * inv_freq  # (..., L, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]  # (..., L, 1, hd): broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., L, D) normalized, positions (..., L) -> q, k, v (..., L, nh, hd), q and k rotated."""
        return self.project(x, *self.rope(positions, x.dtype))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``qkv`` with the rotary tables of the positions given: cos, sin (..., L, 1, hd)."""
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (..., L, nh, hd)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The two residual branches' ends: x + o_proj(attn), then the SwiGLU MLP. attn (..., L, nh, hd)."""
        x = x + self.o_proj(attn.flatten(-2))  # (..., L, D)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Training form: (B, L, D) -> (B, L, D), causal over the block, positions 0 .. L-1."""
        positions = torch.arange(hidden.shape[-2], device=hidden.device)  # (L,)
        q, k, v = self.qkv(self.attn_norm(hidden), positions)  # (B, L, nh, hd)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.finish(hidden, attn.transpose(1, 2))  # attn: (B, nh, L, hd) -> (B, L, nh, hd)


class PrefixCache:
    """The prefix layer's static KV cache for one sequence (decoding form). Belongs to a decoder, like its backbone's.

    ``length`` (0-d long, on the device) counts the committed entries; entry i holds the token at position i.
    """

    def __init__(
        self, layer: PrefixLayer, max_seq_len: int, device: torch.device, dtype: torch.dtype, kernel: bool = False
    ):
        self.layer = layer
        shape = (max_seq_len, layer.num_heads, layer.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (S, nh, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (S, nh, hd)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.cos, self.sin = layer.rope(torch.arange(max_seq_len, device=device), dtype)  # (S, 1, hd): once
        # Decode steps attend by the backbone's split-K Triton kernel over the filled slots only (the new rows are
        # its "tree", under a causal mask); the eager prefill and CPU steps use SDPA.
        self.kernel = kernel
        self._causal: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.length.zero_()

    @torch.no_grad()
    def extend(self, hidden: torch.Tensor, count: torch.Tensor | int | None = None) -> torch.Tensor:
        """Append rows (n, D) at positions length .. length+n-1; return the layer's outputs there (n, D).

        Row i attends to cache entries 0 .. length+i. Only the first ``count`` rows (0-d device tensor or int <= n;
        None: all n) are kept: the length advances by ``count``, and the slots of the rows past it (padding, like the
        backbone's rejected tree nodes) are overwritten by the next call. Tensor-only, no host sync on a GPU.
        """
        n, dev = hidden.shape[0], hidden.device
        slots = self.length + torch.arange(n, device=dev)  # (n,) positions, and cache slots, of the new rows
        cos, sin = self.cos.index_select(0, slots), self.sin.index_select(0, slots)  # (n, 1, hd)
        q, k, v = self.layer.project(self.layer.attn_norm(hidden), cos, sin)  # (n, nh, hd)
        self.k.index_copy_(0, slots, k)
        self.v.index_copy_(0, slots, v)
        if self.kernel and count is not None and n <= KERNEL_MAX_ROWS:
            from medusa_llama.decode.attention import tree_attention

            if n not in self._causal:
                self._causal[n] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
            attn = tree_attention(q[None], self.k[None], self.v[None], self.length, self._causal[n])[0]  # (n, nh, hd)
            self.length += count
            return self.layer.finish(hidden, attn)
        # On a GPU the shapes stay fixed (CUDA graphs): attention spans the whole cache. On the CPU only the filled
        # slots (reading the length there costs no device sync), as the backbone does.
        span = self.k.shape[0] if dev.type == "cuda" else int(self.length) + n
        visible = torch.arange(span, device=dev)[None, :] <= slots[:, None]  # (n, span): causal over the cache
        attn = sdpa(
            q.transpose(0, 1)[None],  # (1, nh, n, hd)
            self.k[:span].transpose(0, 1)[None],  # (1, nh, span, hd)
            self.v[:span].transpose(0, 1)[None],
            attn_mask=visible,
        )[0].transpose(0, 1)  # (n, nh, hd)
        self.length += n if count is None else count
        return self.layer.finish(hidden, attn)
