"""A compact Llama-family decoder for fast tree verification (gpt-fast style, one file).

It takes the weights of an HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` and adds what
Medusa decoding needs and HF's forward makes slow: a static, preallocated KV cache written by index, tree attention
through an additive mask with explicit positions, KV compaction after acceptance, and fixed shapes so that a
whole decode / verify step can be captured in one CUDA graph. ``tests/decode/test_model.py`` proves it equal to the HF
forward on a tiny random model in fp32.

Two paths compute the same function. The PyTorch path (the CPU's, and the reference) attends by SDPA with a dense
additive mask. The kernel path (on a GPU) attends by the split-K Triton kernel of ``attention.py`` over the live
cache only, given a ``TreeMask`` instead of a dense mask, and with ``use_fused_kernels`` runs each layer's RMSNorm +
residual add, rotary embedding + cache write and SwiGLU product as one Triton kernel each (``kernels.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # the GPU path's Triton kernels; the CPU path needs no Triton
    from medusa_llama.decode import attention, cache_kernels, kernels
except ImportError:  # pragma: no cover - depends on the install
    attention = cache_kernels = kernels = None

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def kernels_available() -> bool:
    return kernels is not None


class TreeMask(NamedTuple):
    """Tree attention by the Triton kernel: the T new tokens see slots < ``cache_len`` and the tree nodes ``mask``
    allows (their own K/V sit at slots cache_len .. cache_len + T - 1). Passed where the PyTorch path takes the
    dense additive mask."""

    cache_len: torch.Tensor  # 0-d long, on the device; or (B,), one length per sequence (batched decoding)
    mask: torch.Tensor  # (T, T) bool or int8


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf_config(cls, cfg) -> ModelArgs:
        """Raises ``NotImplementedError`` for configurations this model does not reproduce exactly."""
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(f"model type {cfg.model_type!r}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"activation {cfg.hidden_act!r}")
        if getattr(cfg, "use_sliding_window", False) or (
            cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)
        ):
            raise NotImplementedError("sliding-window attention")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            norm_eps=cfg.rms_norm_eps,
            qkv_bias=attention_bias or cfg.model_type == "qwen2",  # Qwen2 always has q/k/v biases
            o_bias=attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        )


class RMSNorm(nn.Module):
    """As HF's LlamaRMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Every SDPA backend but cuDNN's, which builds an execution plan for each new shape: on an H200 that cost about
45 ms per new prompt length (``benchmarks/sdpa_first_call.py``), paid by every prefill, against under 0.4 ms."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` without the cuDNN backend (``SDPA_BACKENDS``)."""
    with sdpa_kernel(SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def add_linear(x: torch.Tensor, y: torch.Tensor, linear: nn.Linear, inplace: bool = False) -> torch.Tensor:
    """``x + linear(y)`` as one addmm (the GEMM adds x, rounding once): x (..., D), y (..., I) -> (..., D).

    ``inplace``: into x itself (x contiguous, no longer needed by the caller). The same GEMM with the same inputs,
    so the same bits, without the copy of x into a new output that an out-of-place addmm launches first."""
    if inplace:
        x.view(-1, x.shape[-1]).addmm_(y.reshape(-1, y.shape[-1]), linear.weight.t())
        return x
    return torch.addmm(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), linear.weight.t()).view(x.shape)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.wqkv = nn.Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=a.qkv_bias)  # fused q, k, v
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)

    def forward(self, x, cos, sin, mask, slots, k_cache, v_cache, fused: bool = False):
        # x: (B, T, D); cos/sin: (B, T, hd); mask: (B, 1, T, S') additive over the first S' <= S cache slots, or a
        # TreeMask; slots: (T,) cache slots to write, the same for every row, or (B, T) one set per row (batched
        # decoding, each sequence at its own cache length); k_cache/v_cache: (B, S, n_kv, hd), updated in place.
        a = self.a
        b, t, _ = x.shape
        qkv = self.wqkv(x)  # (B, T, (nh + 2 n_kv) * hd)
        if fused and slots.dim() == 1:  # the fused cache write takes one set of slots; per-row slots take PyTorch
            q = kernels.rope_cache_write(qkv, cos, sin, slots, k_cache, v_cache, a.n_heads)  # (B, T, nh, hd)
            q = q.transpose(1, 2)  # (B, nh, T, hd), as the PyTorch path leaves it
        else:
            q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], -1)
            q = q.view(b, t, a.n_heads, a.head_dim).transpose(1, 2)  # (B, nh, T, hd)
            k = k.view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
            v = v.view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if slots.dim() == 1:
                k_cache.index_copy_(1, slots, k.transpose(1, 2))  # (B, T, n_kv, hd) into slots
                v_cache.index_copy_(1, slots, v.transpose(1, 2))
            else:
                rows = torch.arange(b, device=slots.device)[:, None]  # (B, 1)
                k_cache.index_put_((rows, slots), k.transpose(1, 2))  # (B, T, n_kv, hd) into (row, slot)
                v_cache.index_put_((rows, slots), v.transpose(1, 2))
        if isinstance(mask, TreeMask):
            y = attention.tree_attention(q.transpose(1, 2), k_cache, v_cache, mask.cache_len, mask.mask)
            return self.wo(y.view(b, t, a.n_heads * a.head_dim))  # (B, T, nh, hd) -> (B, T, nh * hd)
        s = mask.shape[-1]  # attend over the slots the mask covers: all S on a GPU, the filled ones on CPU
        k_all = k_cache[:, :s].transpose(1, 2)  # (B, n_kv, S', hd)
        v_all = v_cache[:, :s].transpose(1, 2)
        y = sdpa(q, k_all, v_all, attn_mask=mask, enable_gqa=a.n_heads != a.n_kv_heads)
        y = y.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim)  # (B, T, nh * hd)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(a.dim, 2 * a.intermediate_size, bias=a.mlp_bias)  # fused gate, up
        self.w2 = nn.Linear(a.intermediate_size, a.dim, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            return self.w2(kernels.silu_mul(self.w13(x)))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x, cos, sin, mask, slots, k_cache, v_cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, slots, k_cache, v_cache)
        return x + self.feed_forward(self.ffn_norm(x))

    def forward_fused(self, x, h, next_norm: RMSNorm, cos, sin, mask, slots, k_cache, v_cache):
        """The same block by the fused kernels. x: residual stream; h: this block's normalised input (the previous
        block computed it with its last residual add). Returns (x, next_norm(x)) after this block."""
        a = self.attention(h, cos, sin, mask, slots, k_cache, v_cache, fused=True)
        x, h = kernels.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps)
        return kernels.add_rms_norm(x, self.feed_forward(h, fused=True), next_norm.weight, next_norm.eps)


class FastLlama(nn.Module):
    """Llama-family decoder over a static KV cache. ``forward`` returns final normalised hidden states."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.ones(a.head_dim // 2), persistent=False)
        self.rope_scale = 1.0
        self.k_cache: torch.Tensor | None = None  # (L, B, S, n_kv, hd)
        self.v_cache: torch.Tensor | None = None
        self.rope_table: torch.Tensor | None = None  # (2, S, hd): cos, sin of every cache position (``setup_cache``)
        self.use_fused_kernels = False  # the Triton RMSNorm / rotary / SwiGLU kernels (GPU only; the backbone sets it)

    @classmethod
    @torch.no_grad()
    def from_hf(cls, hf_model) -> FastLlama:
        """Build from an HF causal LM, copying (and fusing) its weights. Raises NotImplementedError if unsupported."""
        a = ModelArgs.from_hf_config(hf_model.config)
        inner = hf_model.model
        ref = inner.embed_tokens.weight
        with torch.device("meta"):
            m = cls(a)
        m = m.to(dtype=ref.dtype).to_empty(device=ref.device)  # allocate once, in the model's dtype
        m.tok_embeddings.weight.copy_(ref)
        m.output.weight.copy_(hf_model.lm_head.weight)
        m.norm.weight.copy_(inner.norm.weight)
        for blk, hl in zip(m.layers, inner.layers, strict=True):
            att, mlp = hl.self_attn, hl.mlp
            blk.attention_norm.weight.copy_(hl.input_layernorm.weight)
            blk.ffn_norm.weight.copy_(hl.post_attention_layernorm.weight)
            blk.attention.wqkv.weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
            if a.qkv_bias:
                blk.attention.wqkv.bias.copy_(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
            blk.attention.wo.weight.copy_(att.o_proj.weight)
            if a.o_bias:
                blk.attention.wo.bias.copy_(att.o_proj.bias)
            blk.feed_forward.w13.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            blk.feed_forward.w2.weight.copy_(mlp.down_proj.weight)
            if a.mlp_bias:
                blk.feed_forward.w13.bias.copy_(torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]))
                blk.feed_forward.w2.bias.copy_(mlp.down_proj.bias)
        rope = inner.rotary_emb  # take HF's own frequencies: every rope_scaling variant comes out exact
        m.inv_freq = rope.inv_freq.detach().float().clone().to(ref.device)
        m.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        return m.eval()

    def setup_cache(self, max_seq_len: int, batch_size: int = 1) -> None:
        """The model's own KV cache of ``max_seq_len`` slots, and the rotary tables of as many positions: a forward
        then gathers its positions' cos and sin in one launch instead of computing them in nine (the same values:
        ``rope`` computes each element alone)."""
        self.k_cache, self.v_cache = self.new_cache(max_seq_len, batch_size)
        w = self.tok_embeddings.weight
        self.rope_table = torch.stack(self.rope(torch.arange(max_seq_len, device=w.device), w.dtype))

    def new_cache(self, max_seq_len: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A zeroed (k, v) cache pair, each (L, B, S, n_kv, hd), in the model's dtype and device."""
        a, w = self.a, self.tok_embeddings.weight
        shape = (a.n_layers, batch_size, max_seq_len, a.n_kv_heads, a.head_dim)
        return (
            torch.zeros(shape, dtype=w.dtype, device=w.device),
            torch.zeros(shape, dtype=w.dtype, device=w.device),
        )

    @property
    def max_seq_len(self) -> int:
        return 0 if self.k_cache is None else self.k_cache.shape[2]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def forward(self, tokens, positions, slots, mask, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """tokens, positions: (B, T) long; slots: (T,) or (B, T) cache slots; mask: (B, 1, T, S' <= S) additive, or a
        TreeMask (kernel attention). ``cache``: (k, v), each (L, B, S, n_kv, hd), to use instead of the model's own
        (a batched decoder owns its cache; a view of one row prefills that row). Returns the final normalised
        hidden states (B, T, D)."""
        k_cache, v_cache = cache if cache is not None else (self.k_cache, self.v_cache)
        x = self.tok_embeddings(tokens)  # (B, T, D)
        if self.rope_table is None:
            cos, sin = self.rope(positions, x.dtype)
        else:
            cos, sin = self.rope_table[:, positions]  # (B, T, hd) each, positions < S
        if self.use_fused_kernels:
            layers = self.layers
            _, h = kernels.add_rms_norm(x, None, layers[0].attention_norm.weight, layers[0].attention_norm.eps)
            for i, layer in enumerate(layers):
                nxt = layers[i + 1].attention_norm if i + 1 < len(layers) else self.norm
                x, h = layer.forward_fused(x, h, nxt, cos, sin, mask, slots, k_cache[i], v_cache[i])
            return h
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, slots, k_cache[i], v_cache[i])
        return self.norm(x)


def commit_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    path: torch.Tensor,
    n: torch.Tensor,
    active: torch.Tensor | None = None,
    fused: bool = False,
) -> None:
    """Keep each sequence's tree nodes ``path[:n+1]`` (root first) as its next n+1 cache entries, in place.

    k_cache, v_cache: (L, B, S, n_kv, hd), the tree's K/V at slots cache_len .. cache_len + T - 1 of each row;
    cache_len (B,) long, path (B, D+1) long, n (B,) long, or 0-d / (D+1,) / 0-d for one sequence; active (B,) bool:
    rows that advance (None: all). All D+1 path slots move (fixed shapes); those past the n+1 kept ones lie beyond
    the new cache length, masked out and overwritten later. A path of the root alone (vanilla decoding) moves nothing:
    the root already sits in its slot. ``fused``: by two Triton launches (``cache_kernels``, a GPU)."""
    if path.shape[-1] > 1 and fused:
        cache_kernels.move_path(k_cache, v_cache, cache_len, path)
    elif path.shape[-1] > 1:
        lens = cache_len.view(-1, 1)  # (B, 1)
        b = lens.shape[0]
        dst = lens + torch.arange(path.shape[-1], device=path.device)  # (B, D+1)
        src = lens + path.view(b, -1).clamp(min=0)
        rows = slice(None) if b == 1 else torch.arange(b, device=path.device)[:, None]  # (B, 1)
        for cache in (k_cache, v_cache):
            cache[:, rows, dst] = cache[:, rows, src]  # (L, B, D+1, n_kv, hd); reads before writes
    if fused:
        cache_kernels.advance(cache_len, n, active)
    else:
        cache_len += n + 1 if active is None else (n + 1) * active


def put_where(buf: torch.Tensor, index, new: torch.Tensor, keep: torch.Tensor) -> None:
    """``buf[index] = new`` where ``keep`` (broadcast against ``new``), and ``buf[index]``'s own values elsewhere:
    a write that leaves the masked-out entries as they were, tensor-only (the bucketed prefill of ``batch.py`` points
    its padding rows at another sequence's row and writes nothing there). Duplicate indices must carry equal values:
    index_put keeps one of them."""
    buf[index] = torch.where(keep, new, buf[index])


def tree_attention_mask(cache_len: torch.Tensor, tree_mask: torch.Tensor, max_seq_len: int, dtype) -> torch.Tensor:
    """Additive mask (1, 1, T, S): row i sees every cached slot < cache_len and the tree nodes ``tree_mask[i]``.

    The T new tokens occupy slots cache_len .. cache_len + T - 1; built from tensors only, so a CUDA graph
    can capture it with ``cache_len`` changing between replays.
    """
    t = tree_mask.shape[0]
    rel = torch.arange(max_seq_len, device=tree_mask.device) - cache_len  # (S,) slot offset from the tree start
    in_tree = (rel >= 0) & (rel < t)
    allowed = (rel < 0)[None, :] | (in_tree[None, :] & tree_mask[:, rel.clamp(0, t - 1)])  # (T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=tree_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]  # (1, 1, T, S)


def batched_tree_attention_mask(
    cache_len: torch.Tensor, tree_mask: torch.Tensor, max_seq_len: int, dtype
) -> torch.Tensor:
    """``tree_attention_mask`` for B sequences at their own cache lengths: cache_len (B,) -> additive (B, 1, T, S).

    Row b's T new tokens occupy slots cache_len[b] .. cache_len[b] + T - 1 of its own cache row."""
    t = tree_mask.shape[0]
    rel = torch.arange(max_seq_len, device=tree_mask.device)[None, :] - cache_len[:, None]  # (B, S)
    in_tree = (rel >= 0) & (rel < t)  # (B, S)
    node = tree_mask[:, rel.clamp(0, t - 1)].permute(1, 0, 2)  # (T, B, S) -> (B, T, S): sees the node in slot s
    allowed = (rel < 0)[:, None, :] | (in_tree[:, None, :] & node)  # (B, T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=tree_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, T, S)
