"""The decoding backbone: the one interface the decoders use, over the fast model or the HF forward.

Both implementations hold a KV cache of ``cache_len`` committed tokens (a 0-d long tensor on the device, so that
CUDA graphs can capture steps that read it) and offer the same four operations:

- ``prefill(tokens)``: run the prompt, commit it, return its hidden states (the fast backbone also takes a device
  ``length`` for prompts padded to a fixed size: the decoders' CUDA-graph prefill);
- ``forward_tree(tokens, tree_mask, depth)``: run T new tokens at slots cache_len .. cache_len+T-1 with positions
  cache_len + depth and the tree mask, WITHOUT committing them;
- ``commit(path, n)``: keep tree nodes ``path[:n+1]`` (root first) as the next n+1 cache entries;
- ``logits(hidden)`` / ``embed(tokens)``: the LM head (fp32 logits; the greedy GPU path takes them in the model's
  dtype, or their argmax keys from one fused launch: ``greedy_logits``) and the token embedding (the Medusa heads use
  both).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch.nn.attention import sdpa_kernel

from medusa_llama.decode.cpu_linear import pack_linears
from medusa_llama.decode.model import (
    SDPA_BACKENDS,
    FastLlama,
    TreeMask,
    commit_cache,
    kernels_available,
    tree_attention_mask,
)
from medusa_llama.errors import MedusaError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fast", "hf")


class Backbone:
    """Shared parts of the two backbones. See the module docstring for the contract."""

    supports_cuda_graphs = False

    def __init__(self, hf_model, tokenizer, name: str, max_seq_len: int):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name = name
        cfg = hf_model.config
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.device = hf_model.get_input_embeddings().weight.device
        self.dtype = hf_model.get_input_embeddings().weight.dtype
        limit = getattr(cfg, "max_position_embeddings", None) or max_seq_len
        self.max_seq_len = min(max_seq_len, limit)
        self.cache_len = torch.zeros((), dtype=torch.long, device=self.device)
        self.eos_token_ids = _eos_ids(hf_model, tokenizer)

    def reset(self) -> None:
        self.cache_len.zero_()

    def logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """(..., D) -> (..., V) float32; ``float32=False``: in the LM head's dtype, for the greedy rule's kernels on the
        GPU path (``acceptance.greedy_kernel``), which read bf16 as it is (its upcast is exact) and so spare the cast
        kernel (8 us for 64 rows of 49152 on an H200)."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def greedy_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the greedy rule's kernels read on the GPU path (``acceptance.greedy_kernel``), (..., D) ->: the argmax
        keys (..., 1) int64 of the LM head's logits in its dtype, by ``lm_head.argmax_linear`` (the GEMM and the argmax
        in one launch, the logits never written) where ``lm_head.FUSED_ARGMAX`` holds, for ``lm_head.FUSED_MIN_ROWS``
        rows or more (a tree's verify; the vanilla step's one row keeps cuBLAS) and hidden sizes up to
        ``lm_head.FUSED_MAX_HIDDEN``; else the logits (..., V) in the LM head's dtype (``logits(hidden,
        float32=False)``), which ``accept_into`` / ``next_token_into`` key by ``kernels.argmax_keys``."""
        from medusa_llama.decode import lm_head

        head = self.lm_head  # an LM head with a bias (rare) keeps the unfused path
        rows = hidden.numel() // hidden.shape[-1]
        fused = lm_head.FUSED_ARGMAX and rows >= lm_head.FUSED_MIN_ROWS and hidden.shape[-1] <= lm_head.FUSED_MAX_HIDDEN
        if fused and getattr(head, "bias", None) is None and head.weight.dtype == hidden.dtype:
            return lm_head.argmax_linear(hidden, head.weight)
        return self.logits(hidden, float32=False)

    def check_room(self, prompt_len: int, new_tokens: int) -> None:
        if prompt_len + new_tokens > self.max_seq_len:
            raise MedusaError(
                f"the prompt ({prompt_len} tokens) plus room for {new_tokens} new and tree tokens exceeds the context "
                f"of {self.max_seq_len} tokens: shorten the prompt, lower --max-new-tokens or raise --max-seq-len"
            )


class FastBackbone(Backbone):
    """``FastLlama`` with a static cache: fixed shapes, so steps can be CUDA-graph captured.

    On a GPU with Triton, tree steps attend by the split-K kernel over the live cache (``tree_kernel``) and layers
    run the fused small kernels (``model.use_fused_kernels``); both flags can be turned off to measure or compare.
    """

    def __init__(self, hf_model, tokenizer, name: str, max_seq_len: int):
        super().__init__(hf_model, tokenizer, name, max_seq_len)
        self.model = FastLlama.from_hf(hf_model)
        self.model.setup_cache(self.max_seq_len)
        if self.device.type == "cpu":  # oneDNN-prepacked weights: small batches read each weight once (cpu_linear.py)
            pack_linears(self.model)
        self.lm_head = self.model.output
        self.embed = self.model.tok_embeddings
        self.supports_cuda_graphs = self.device.type == "cuda"
        kernels = self.device.type == "cuda" and kernels_available()
        self.tree_kernel = kernels
        self.model.use_fused_kernels = kernels
        self._offsets = torch.arange(self.max_seq_len, device=self.device)  # sliced: a step launches no arange

    def _run(self, tokens, positions, tree_mask, prefill: bool = False) -> torch.Tensor:
        t = tokens.shape[0]
        slots = self.cache_len + self._offsets[:t]  # (T,)
        if self.tree_kernel and not prefill:  # the prefill (eager, long) keeps SDPA
            mask = TreeMask(self.cache_len, tree_mask)  # the kernel reads the bool mask as it is
        else:
            # On a GPU shapes stay fixed (CUDA graphs, torch.compile), so attention spans the whole cache; on the
            # CPU it spans only the filled slots (reading cache_len there costs no device sync).
            span = self.max_seq_len if self.device.type == "cuda" else int(self.cache_len) + t
            mask = tree_attention_mask(self.cache_len, tree_mask, span, self.dtype)  # (1, 1, T, span)
        return self.model(tokens[None], positions[None], slots, mask)[0]  # (T, D)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, length: torch.Tensor | None = None) -> torch.Tensor:
        """Restart the cache with ``tokens`` (T,) at positions 0 .. T-1; return their hidden states (T, D).

        ``length`` (0-d long, on the device): only the first ``length`` tokens are the prompt, the rest padding (a
        CUDA-graph prefill pads to a fixed size). Padding lies after the prompt, so under the causal mask it changes
        no prompt row; its KV entries land past the new cache length and are overwritten later."""
        self.reset()
        t = tokens.shape[0]
        causal = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        hidden = self._run(tokens, torch.arange(t, device=self.device), causal, prefill=True)
        if length is None:
            self.cache_len.fill_(t)
        else:
            self.cache_len.copy_(length)
        return hidden

    @torch.no_grad()
    def forward_tree(self, tokens, tree_mask, depth) -> torch.Tensor:
        return self._run(tokens, self.cache_len + depth, tree_mask)

    @torch.no_grad()
    def commit(self, path: torch.Tensor, n: torch.Tensor) -> None:
        m = self.model  # on the kernel path one Triton move and one advance (``model.commit_cache``)
        commit_cache(m.k_cache, m.v_cache, self.cache_len, path, n, fused=m.use_fused_kernels)


class HFBackbone(Backbone):
    """The HF forward with a 4-D additive mask and a DynamicCache: any causal LM, correct if slower."""

    def __init__(self, hf_model, tokenizer, name: str, max_seq_len: int):
        super().__init__(hf_model, tokenizer, name, max_seq_len)
        self.lm_head = hf_model.get_output_embeddings()
        self.embed = hf_model.get_input_embeddings()
        self.cache = None
        # transformers >= 5.2x names the argument `cache` (`past_key_values` is deprecated); older ones don't
        params = inspect.signature(hf_model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _run(self, tokens, positions, tree_mask):
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.hf_model.config)
        cached = int(self.cache_len)
        t = tokens.shape[0]
        mask = torch.zeros(t, cached + t, dtype=self.dtype, device=self.device)
        mask[:, cached:].masked_fill_(~tree_mask, torch.finfo(self.dtype).min)  # (T, L + T)
        with sdpa_kernel(SDPA_BACKENDS):  # no cuDNN: it would plan anew for every cache length, i.e. every step
            out = self.hf_model.model(
                input_ids=tokens[None],
                position_ids=positions[None],
                attention_mask=mask[None, None],
                use_cache=True,
                **{self._cache_kw: self.cache},
            )
        return out.last_hidden_state[0]  # (T, D)

    @torch.no_grad()
    def prefill(self, tokens):
        self.reset()
        self.cache = None
        t = tokens.shape[0]
        hidden = self._run(
            tokens, torch.arange(t, device=self.device), torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        )
        self.cache_len.fill_(t)
        return hidden

    @torch.no_grad()
    def forward_tree(self, tokens, tree_mask, depth):
        return self._run(tokens, self.cache_len + depth, tree_mask.to(self.device))

    @torch.no_grad()
    def commit(self, path, n):
        cached, keep = int(self.cache_len), int(n) + 1
        idx = cached + path[:keep].to(self.device)
        for layer in self.cache.layers:  # (B, n_kv, L + T, hd) -> (B, n_kv, L + n + 1, hd)
            layer.keys = torch.cat([layer.keys[..., :cached, :], layer.keys[..., idx, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., :cached, :], layer.values[..., idx, :]], dim=-2)
        self.cache_len += keep


def _eos_ids(hf_model, tokenizer) -> tuple[int, ...]:
    ids = set()
    gen = getattr(hf_model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(getattr(tokenizer, "eos_token_id", None))
    return tuple(sorted(i for i in ids if i is not None))


def make_backbone(hf_model, tokenizer, name: str = "", max_seq_len: int = 2048, backend: str = "auto") -> Backbone:
    """Wrap a loaded HF model. ``auto``: the fast model where it covers the architecture, else the HF forward."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("auto", "fast"):
        try:
            return FastBackbone(hf_model, tokenizer, name, max_seq_len)
        except NotImplementedError as exc:
            if backend == "fast":
                raise MedusaError(f"the fast backbone does not cover this model ({exc}): use --backend hf") from exc
            log.info("fast backbone does not cover %s (%s): using the HF forward", name or "this model", exc)
    return HFBackbone(hf_model, tokenizer, name, max_seq_len)
