"""Prefix attention: one extra decoder layer over the backbone's final hidden states, feeding the heads.

Hydra++ (Ankner et al., 2024, "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding", arXiv:2402.05109,
Sec. 4.2 "prefix attention") adds one Llama-style decoder layer, with its own KV cache, over the base model's last
hidden states h_0 .. h_t; its output at t (instead of h_t) is what the heads read. The heads then see the whole
prefix through a layer trained for drafting, not only the one state the base model shaped for its own next token.

The layer: ``x + Attn(RMSNorm(x))`` (causal, RoPE at absolute token positions, as many heads as the backbone), then
``x + SwiGLU(RMSNorm(x))``. ``o_proj`` and ``down_proj`` start at zero, so a fresh layer is exactly the identity and
fresh prefix heads propose exactly what heads without it would.

Token input (``HeadsConfig.prefix_token_input``, after EAGLE: Li et al., 2024, "EAGLE: Speculative Sampling Requires
Rethinking Feature Uncertainty", arXiv:2401.15077): EAGLE's draft layer reads, at position i, the feature h_i and the
embedding of the token actually chosen after it, e(x_{i+1}). With the option the layer's input is
``x_i = h_i + W_tok e(x_{i+1})`` (``PrefixLayer.inputs``; e the backbone's frozen input embedding, ``W_tok`` the
bias-free ``token`` projection, zero at start: a fresh layer is still the identity, and prefix heads trained without
it start heads with it). Every position the layer runs at has its next token known: in training the block's next
token; in decoding the next committed one (the prompt's tokens 1 .. P-1 then the root at prefill; after a step, the
accepted tokens then the bonus token). Verification is untouched, so decoding stays lossless. Every form below then
takes ``next_emb`` (..., L, D), the embeddings of those next tokens (required with the option, ignored without).

Two forms compute the same function (``tests/decode/test_prefix.py``):
- training: ``PrefixLayer.forward(hidden, next_emb)`` over a whole block (B, L, D), positions 0 .. L-1;
- decoding: ``PrefixCache.extend(hidden, count, next_emb)`` appends rows to a static KV cache owned by the decoder,
  tensor-only with the cache length in a device tensor, so a decode step that extends it stays one CUDA graph;
  ``BatchedPrefixCache`` is the same cache with one row and one length per sequence, for batched decoding.

On a GPU the decode step's extend (the cache's ``kernel`` path: a few rows, attended by the backbone's split-K Triton
kernel) can run the layer through fused Triton kernels, with the rounding points of the PyTorch form
(``BatchedPrefixCache._extend_fused``). It is on by default (``FUSED_EXTEND``): on an H200, ``benchmarks/gpu_check.py``
with it decoded exactly as the reference and ``benchmarks/step_profile.py`` cut the Medusa step from 1.434 to 1.366 ms
(``results/gpu/issue8/``). With ``FUSED_GEMMS`` (the default) the two input GEMMs carry the ops around them
(``small_linear.py``): RMSNorm + q/k/v GEMM + rotary + K/V cache write in one launch, the residual add in the o_proj
GEMM (addmm), RMSNorm + gate/up GEMM + SwiGLU product in one; an extend is then 7 launches after its inputs (the token
addmm, those two, attention's split and merge, the o_proj and down addmms) instead of 11 with the backbone's kernels
(``kernels.py``: RMSNorm, q/k/v GEMM, rotary + cache write, o_proj, residual add + RMSNorm, gate/up GEMM, SwiGLU),
and 41-47 with the PyTorch ops. ``benchmarks/prefix_extend_speed.py`` times both on a GPU.
The decoder's step extends by its accepted path through ``PrefixCache.extend_path``: the gathers of the path's
states and its tokens' embeddings, the slots, the rotary tables and the length's advance in one launch.
The CPU, training, the prefill and the reference keep the PyTorch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medusa_llama.decode.model import RMSNorm, add_linear, put_where, rotate_half, sdpa

NORM_EPS = 1e-6
KERNEL_MAX_ROWS = 128
"""Decode-step extends of at most this many rows go through the Triton kernel (its tuned range of tree sizes)."""
FUSED_EXTEND = True
"""The default of the caches' ``fused``: the fused decode-step extend on the kernel path (a GPU). Checked against the
PyTorch ops by ``benchmarks/gpu_check.py`` on the GPU and by the tests through Triton's interpreter."""
FUSED_GEMMS = True
"""The fused extend's GEMMs with their prologues and epilogues (``small_linear.py``: 7 launches an extend) rather than
the backbone's separate kernels around cuBLAS (11). Read at each extend (a CUDA graph keeps what it captured)."""


class PrefixLayer(nn.Module):
    """A Llama decoder layer (MHA, no GQA) over hidden states; the identity when fresh. See the module docstring.

    ``token_input``: the layer also reads the next token's embedding through ``token`` (EAGLE-style, zero at start).
    """

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, rope_theta: float, token_input: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_theta = num_heads, dim // num_heads, rope_theta
        self.attn_norm = RMSNorm(dim, NORM_EPS)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.mlp_norm = RMSNorm(dim, NORM_EPS)
        self.gate_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, dim, bias=False)
        self.token = nn.Linear(dim, dim, bias=False) if token_input else None  # W_tok: e(x_{i+1}) -> the input
        for lin in (self.o_proj, self.down_proj, self.token):
            if lin is not None:
                nn.init.zeros_(lin.weight)  # both residual branches (and the token input) add zero: the identity

    def inputs(
        self, hidden: torch.Tensor, next_emb: torch.Tensor | None = None, fused: bool = False, scratch: bool = False
    ) -> torch.Tensor:
        """The layer's input (..., L, D): ``hidden``, plus ``token(next_emb)`` with the token input. ``next_emb``
        (..., L, D): the embeddings of the tokens after each position (required with the token input, else ignored).
        ``fused`` (the fused decode-step extend): the add done by the token GEMM (one addmm, rounding once), into
        ``hidden`` itself where it is ``scratch`` (the caller's own buffer, not needed after).
        """
        if self.token is None:
            return hidden
        if next_emb is None:
            raise ValueError("this prefix layer reads the next tokens' embeddings (prefix_token_input): pass next_emb")
        if fused:
            return add_linear(hidden, next_emb.to(hidden.dtype), self.token, inplace=scratch)
        return hidden + self.token(next_emb.to(hidden.dtype))

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

    def forward(self, hidden: torch.Tensor, next_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Training form: (B, L, D) -> (B, L, D), causal over the block, positions 0 .. L-1. ``next_emb`` (B, L, D):
        e(x_{i+1}) at each position i, for the token input (see ``inputs``)."""
        x = self.inputs(hidden, next_emb)  # (B, L, D)
        positions = torch.arange(x.shape[-2], device=x.device)  # (L,)
        q, k, v = self.qkv(self.attn_norm(x), positions)  # (B, L, nh, hd)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.finish(x, attn.transpose(1, 2))  # attn: (B, nh, L, hd) -> (B, L, nh, hd)


def successors(tokens: torch.Tensor, lengths: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The token after each position of right-padded prompts, the prefix layer's token input at a prefill: tokens
    (..., P), of which the first ``lengths`` (...) are real; ``first`` (...): the first new token, after the last
    real one. Returns (..., P): the prompt's next token, ``first`` at position length-1, token 0 past it (padding,
    never kept). Tensor-only (the CUDA-graph prefills run it)."""
    after = torch.cat([tokens[..., 1:], torch.zeros_like(tokens[..., :1])], dim=-1)
    return after.scatter_(-1, (lengths - 1).unsqueeze(-1), first.unsqueeze(-1))


class BatchedPrefixCache:
    """The prefix layer's static KV cache (decoding form) for B sequences, one row each (``batch.py``).

    ``lengths`` ((B,) long, on the device) counts each row's committed entries; entry i of a row holds its token at
    position i. ``prefill_many(rows, hidden, lengths)`` runs right-padded prompts into their rows at once (eagerly, or
    tensor-only with a ``keep`` mask in the bucketed CUDA-graph prefill; ``prefill(row, hidden)`` is its batch of
    one); ``extend(hidden, count)`` appends rows to every sequence at once, tensor-only and with fixed shapes, so a
    batched step that extends it stays one CUDA graph. Each takes ``next_emb`` shaped like ``hidden``: the next
    tokens' embeddings, for a layer with the token input.

    ``kernel`` (a GPU with Triton; the decoders pass their backbone's ``tree_kernel``): decode-step extends (a count
    given, at most ``KERNEL_MAX_ROWS`` rows) attend by the split-K Triton kernel and, with ``fused`` (None: the
    module's ``FUSED_EXTEND``), run the whole layer by the fused Triton kernels (``_extend_fused``); otherwise the
    PyTorch ops.
    """

    def __init__(
        self,
        layer: PrefixLayer,
        batch_size: int,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
        kernel: bool = False,
        fused: bool | None = None,
    ):
        self.layer = layer
        shape = (batch_size, max_seq_len, layer.num_heads, layer.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (B, S, nh, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (B, S, nh, hd)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        # (2, S, 1, hd): cos and sin of every position, once; a step gathers both in one launch
        self.rope_table = torch.stack(layer.rope(torch.arange(max_seq_len, device=device), dtype))
        self._rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
        # Decode steps attend by the backbone's split-K Triton kernel over the filled slots only, one length per row
        # (the new rows are its "tree", under a causal mask); the eager prefill and CPU steps use SDPA.
        self.kernel = kernel
        self._causal: dict[int, torch.Tensor] = {}
        self._aranges: dict[int, torch.Tensor] = {}
        # Those steps may also run the layer by the fused kernels (``fused``, only with ``kernel``), with its
        # q/k/v and gate/up weights concatenated here, once: the heads are frozen while a decoder holds this cache
        # (a layer trained further afterwards needs a new cache). The copies cost 3 D^2 + 2 D I more weights.
        self.fused = kernel and (FUSED_EXTEND if fused is None else fused)
        if self.fused:
            self._wqkv = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]).detach()  # (3D, D)
            self._w13 = torch.cat([layer.gate_proj.weight, layer.up_proj.weight]).detach()  # (2I, D): gate first
            self._slot_base = torch.arange(batch_size, device=device)[:, None] * max_seq_len  # (B, 1) flat row starts

    @torch.no_grad()
    def prefill(self, row: int, hidden: torch.Tensor, next_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Restart row ``row`` with a prompt's hidden states (P, D) at positions 0 .. P-1; return the outputs (P, D).
        ``next_emb`` (P, D): the embeddings of the prompt's tokens 1 .. P-1 and of the first new token."""
        length = torch.full((1,), hidden.shape[0], dtype=torch.long, device=hidden.device)
        return self.prefill_many([row], hidden[None], length, None if next_emb is None else next_emb[None])[0]

    @torch.no_grad()
    def prefill_many(
        self,
        rows: list[int] | torch.Tensor,
        hidden: torch.Tensor,
        lengths: torch.Tensor,
        next_emb: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Restart rows ``rows`` with b prompts' hidden states at once: hidden (b, P, D) right-padded, row i real at
        positions 0 .. lengths[i]-1 ((b,) long, on the device). Returns the outputs (b, P, D), garbage past each
        row's length. ``next_emb`` (b, P, D): the next token's embedding at each real position (see ``prefill``),
        anything at the padding.

        The training form's causal attention over the block: a real entry sees only entries before it, all real
        (the padding lies after them). The padding's K/V land in slots past the row's length, overwritten later.

        ``keep`` ((b, P) bool, on the device; tensor-only form for the bucketed prefill): write only the entries it
        marks, and the lengths of the rows it marks any of; the rest of the rows named stays as it was (a padding row
        of the bucket, all False, may name another sequence's row)."""
        p = hidden.shape[1]
        index = torch.as_tensor(rows, dtype=torch.long, device=hidden.device)  # (b,)
        x = self.layer.inputs(hidden, next_emb)  # (b, P, D)
        q, k, v = self.layer.project(self.layer.attn_norm(x), *self.rope_table[:, :p])  # (b, P, nh, hd)
        if keep is None:
            self.k[index, :p] = k
            self.v[index, :p] = v
            self.lengths[index] = lengths
        else:
            for cache, new in ((self.k, k), (self.v, v)):
                put_where(cache, (index, slice(0, p)), new, keep[:, :, None, None])  # (b, P, nh, hd)
            put_where(self.lengths, index, lengths, keep.any(1))
        attn = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)  # (b, nh, P, hd)
        return self.layer.finish(x, attn.transpose(1, 2))  # attn: (b, P, nh, hd)

    @torch.no_grad()
    def extend(
        self, hidden: torch.Tensor, count: torch.Tensor | int | None = None, next_emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Append n rows to every sequence: hidden (B, n, D) at positions lengths[b] .. lengths[b]+n-1; return the
        layer's outputs there (B, n, D). ``next_emb`` (B, n, D): the embedding of the token after each row's (the
        token input; anything for the padding rows).

        Row i of sequence b attends to its entries 0 .. lengths[b]+i. Only the first ``count[b]`` rows of sequence b
        ((B,) or 0-d device tensor, or int <= n; 0 for a sequence that must not advance; None: all n) are kept: its
        length advances by that many, and the slots of the rows past them (padding, like the backbone's rejected
        tree nodes) are overwritten by the next call. Tensor-only, no host sync on a GPU.
        """
        k_cache, v_cache, length = self.k, self.v, self.lengths  # (B, S, nh, hd), (B,)
        b, n, dev = hidden.shape[0], hidden.shape[1], hidden.device
        slots = length[:, None] + self._arange(n, dev)  # (b, n) positions, and cache slots, of the new rows
        kernel = self.kernel and count is not None and n <= KERNEL_MAX_ROWS
        if kernel and self.fused:
            cos_sin = self.rope_table.view(2, -1, self.layer.head_dim)[:, slots]  # (2, b, n, hd)
            out = self._extend_fused(hidden, next_emb, slots, cos_sin, length)
            length += count
            return out
        x = self.layer.inputs(hidden, next_emb)  # (b, n, D)
        q, k, v = self.layer.project(self.layer.attn_norm(x), *self.rope_table[:, slots])  # (b, n, nh, hd)
        k_cache[self._rows[:b], slots] = k
        v_cache[self._rows[:b], slots] = v
        if kernel:
            attn = self._tree_attention(q, k_cache, v_cache, length)  # (b, n, nh, hd)
        else:
            # On a GPU the shapes stay fixed (CUDA graphs): attention spans the whole cache. On the CPU only the
            # filled slots (reading the lengths there costs no device sync), as the backbone does.
            span = k_cache.shape[1] if dev.type == "cuda" else int(length.max()) + n
            visible = torch.arange(span, device=dev) <= slots[..., None]  # (b, n, span): causal over each row
            attn = sdpa(
                q.transpose(1, 2),  # (b, nh, n, hd)
                k_cache[:, :span].transpose(1, 2),  # (b, nh, span, hd)
                v_cache[:, :span].transpose(1, 2),
                attn_mask=visible[:, None],
            ).transpose(1, 2)  # (b, n, nh, hd)
        length += n if count is None else count
        return self.layer.finish(x, attn)

    def _arange(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) 0 .. n-1, made once per n (a step's extend then launches no kernel for it)."""
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n, device=device)
        return self._aranges[n]

    def _tree_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor
    ) -> torch.Tensor:
        """The new rows q (b, n, nh, hd), already in their slots length .. length+n-1, attend causally by the
        split-K Triton kernel over each sequence's filled slots. Returns (b, n, nh, hd)."""
        from medusa_llama.decode.attention import tree_attention

        n = q.shape[1]
        if n not in self._causal:
            self._causal[n] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # the kernel reads bool
        return tree_attention(q, k_cache, v_cache, length, self._causal[n])

    def _extend_fused(
        self,
        hidden: torch.Tensor,
        next_emb: torch.Tensor | None,
        slots: torch.Tensor,
        cos_sin: torch.Tensor,
        length: torch.Tensor,
        scratch: bool = False,
    ) -> torch.Tensor:
        """The layer over the new rows hidden (b, n, D) at ``slots`` (b, n) (their positions: ``length`` (b,), the
        filled slots before them, onwards), with their rotary tables ``cos_sin`` (2, b n, hd), by fused Triton
        kernels. Returns the outputs (b, n, D). With ``FUSED_GEMMS`` (``small_linear.py``, 7 launches): the token
        input added in the token GEMM (addmm); ``attn_norm`` + one q/k/v GEMM + rotary + K/V cache write
        (``rms_qkv_rope``); attention (split, merge); ``o_proj`` adding the residual (addmm); ``mlp_norm`` + one
        gate/up GEMM + SwiGLU product (``rms_gate_up_silu``); ``down_proj`` adding the residual (addmm). Without
        (``kernels.py`` around cuBLAS, 11): the token addmm, ``attn_norm``, the q/k/v GEMM, rotary + cache write,
        attention, ``o_proj``, residual add + ``mlp_norm``, the gate/up GEMM, the SwiGLU product, the down addmm.

        The same function as ``project`` / ``finish`` with the same rounding points (as the backbone's fused layers,
        ``kernels.py``): this layer's RMSNorm (eps ``NORM_EPS``) normalises in fp32, rounds, then scales in the
        weights' dtype, as the kernels do (they only sum the squares in another order); the residual adds and the
        SwiGLU product round where PyTorch does; only the rotary embedding rounds once (fp32 inside the kernel) where
        PyTorch rounds the two products and their sum, the concatenated GEMMs may block their sums otherwise, and the
        residual adds done by addmm (two, three with ``FUSED_GEMMS``: o_proj's too) round once where PyTorch rounds
        the product, then the sum.

        The cache write takes one 1-D set of slots for all rows: the b rows of the cache are seen as one
        (1, b S, nh, hd) row, sequence i's slots offset by i S. ``scratch``: ``hidden`` is the caller's scratch
        buffer, which the token GEMM may add into (contiguous). The residual adds after attention go into this
        call's own buffer (no copy launched before the addmm): the down addmm's always; with ``FUSED_GEMMS`` the o_proj
        addmm's too where x is not the caller's ``hidden`` (it is with neither the token input nor ``scratch``: then
        that addmm writes a new buffer, after a copy of x)."""
        from medusa_llama.decode import kernels, small_linear

        layer, (b, n, d) = self.layer, hidden.shape
        hd, k_cache, v_cache = layer.head_dim, self.k, self.v
        x = layer.inputs(hidden, next_emb, fused=True, scratch=scratch)  # (b, n, D)
        flat = slots.view(-1) if b == 1 else (slots + self._slot_base[:b]).view(-1)  # (b n,) slots of the flat row
        if FUSED_GEMMS:
            cos, sin = cos_sin.reshape(2, b * n, hd)  # (b n, hd) each
            norm = layer.attn_norm
            q = small_linear.rms_qkv_rope(x, norm.weight, norm.eps, self._wqkv, cos, sin, flat, k_cache, v_cache)
            attn = self._tree_attention(q, k_cache, v_cache, length)  # (b, n, nh, hd)
            x = add_linear(x, attn.flatten(-2), layer.o_proj, inplace=scratch or x is not hidden)  # x + o_proj(attn)
            h = small_linear.rms_gate_up_silu(x, layer.mlp_norm.weight, layer.mlp_norm.eps, self._w13)  # (b, n, I)
            return add_linear(x, h, layer.down_proj, inplace=True)  # (b, n, D)
        h = kernels.add_rms_norm(x, None, layer.attn_norm.weight, layer.attn_norm.eps)[1]  # (b, n, D)
        qkv = F.linear(h, self._wqkv).view(1, b * n, 3 * d)  # (1, b n, 3D): q, k, v heads in a row
        cos, sin = cos_sin.view(2, 1, b * n, hd)  # (1, b n, hd) each
        k_flat, v_flat = (cache.view(1, -1, layer.num_heads, hd) for cache in (k_cache, v_cache))  # (1, b S, nh, hd)
        q = kernels.rope_cache_write(qkv, cos, sin, flat, k_flat, v_flat, layer.num_heads)  # (1, b n, nh, hd)
        attn = self._tree_attention(q.view(b, n, layer.num_heads, hd), k_cache, v_cache, length)  # (b, n, nh, hd)
        x, h = kernels.add_rms_norm(x, layer.o_proj(attn.flatten(-2)), layer.mlp_norm.weight, layer.mlp_norm.eps)
        return add_linear(x, kernels.silu_mul(F.linear(h, self._w13)), layer.down_proj, inplace=True)  # (b, n, D)


class PrefixCache(BatchedPrefixCache):
    """The prefix layer's static KV cache for one sequence (a batch of one). Belongs to a decoder, like its backbone's.

    ``length`` (0-d long, on the device) counts the committed entries; entry i holds the token at position i.
    """

    def __init__(
        self,
        layer: PrefixLayer,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
        kernel: bool = False,
        fused: bool | None = None,
    ):
        super().__init__(layer, 1, max_seq_len, device, dtype, kernel, fused)
        self.length = self.lengths[0]  # a view: advances with ``lengths``

    def reset(self) -> None:
        self.lengths.zero_()

    @torch.no_grad()
    def extend(
        self, hidden: torch.Tensor, count: torch.Tensor | int | None = None, next_emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Append rows (n, D) at positions length .. length+n-1; return the layer's outputs there (n, D).

        Row i attends to cache entries 0 .. length+i; ``count`` (0-d device tensor or int <= n; None: all n) and
        ``next_emb`` (n, D) as for ``BatchedPrefixCache.extend``. Tensor-only, no host sync on a GPU.
        """
        return super().extend(hidden[None], count, None if next_emb is None else next_emb[None])[0]

    @torch.no_grad()
    def extend_path(
        self,
        hidden: torch.Tensor,
        path: torch.Tensor,
        n: torch.Tensor,
        emitted: torch.Tensor,
        table: torch.Tensor | None,
        inputs: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """A decode step's extend by its accepted path: ``extend(hidden[path], n + 1, table[emitted])``, the
        gathers, the slots, the rotary tables and the length's advance in one launch (``kernels.path_inputs``).

        hidden (T, D): the verify forward's states; path (D1,) long: the accepted path, clamped (rows past n are
        padding); n (1,) or 0-d long: the accepted nodes; emitted (D1,) long: each path row's successor token;
        table (V, D): the input embedding for the token input (None: a layer without it). Returns (D1, D). Only
        for a ``fused`` cache (the kernel path) and at most ``KERNEL_MAX_ROWS`` rows. ``inputs``: that launch's
        outputs, already made with the acceptance (``acceptance.accept_move_into``, which advanced the length):
        only the layer runs."""
        from medusa_llama.decode import kernels

        token = self.layer.token is not None
        if inputs is None:
            inputs = kernels.path_inputs(
                hidden, path, emitted, n, table if token else None, self.rope_table, self.lengths
            )
        rows, emb, cos_sin, slots, start = inputs
        return self._extend_fused(rows[None], emb[None] if token else None, slots[None], cos_sin, start, True)[0]
