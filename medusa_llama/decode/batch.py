"""Batched decoding: B sequences advance together, one verify forward for all of them per step.

Each sequence owns one row of a (L, B, S, n_kv, hd) KV cache and its own cache length (``cache_len``, (B,) on the
device), so prompts of any lengths share a batch. A step is the single-sequence step of ``decoder.py`` made
batched: the verify forward takes (B, T) tree tokens at positions ``cache_len[b] + depth`` under an additive
(B, 1, T, S) mask (row b's filled prefix plus the tree mask); each row picks its own accepted path and bonus token;
each row's path is compacted into its own cache row. The step is tensor-only (no host syncs), so a GPU can capture
one CUDA graph per (B, tree) shape; the host reads back one (B, D+2) tensor per step.

Sequences join and leave between steps (continuous batching at step granularity): ``add_many`` prefills prompts into
free rows with ONE eager forward (right-padded to the longest, causal within each row; ``add`` is its batch of one;
in groups of similar lengths where the padded batch would pass ``prefill_tokens`` or pad more than a quarter of its
real tokens: ``prefill_groups``), ``step`` advances every row, ``release`` frees a row. A free row still runs through
the step (fixed shapes) but its cache length never advances, so its work is wasted and harmless.

CUDA-graph prefill (``graph_prefill``, on by default with CUDA graphs; issue 10): eagerly a prefill costs ~60 us of
host time per kernel on an H200's host, tens of ms per joining request that stall the whole batch. With it each
prefill group is padded to a bucket of (rows, tokens): its count to a power of two (``rows_bucket``, at most B), its
longest prompt to ``decoder.prefill_bucket``; its token ids, lengths, target cache rows and valid flags go into one
fixed device buffer by one copy, and the whole prefill (backbone, first tokens, prefix layer with its token input,
first proposal, cache lengths) is one graph replay per group, tensor-only, one graph per (bucket, acceptance rule)
captured the first time it is needed (before ``add_many``'s clock starts) into one shared memory pool. A padding row
runs a one-token prompt aimed at a row outside the group and writes nothing: every write is masked to the valid rows
and real entries (``model.put_where``: the masked-out entries get their own values back). Sampled first tokens use
uniform draws made outside the graph exactly as the eager path makes them, so both forms choose the same tokens.
The eager grouped prefill stays the CPU's and the reference; ``padded_prefill`` runs the bucketed form eagerly
(the tests pin it equal to the eager one).

The heads and the greedy rule run once for all rows (``proposal.propose`` and ``acceptance.accept_into`` take a
leading batch dimension; the tests pin rows equal to single sequences). Heads with prefix
attention read the prefix layer's output: its KV cache has one row and one length per sequence too
(``prefix.BatchedPrefixCache``), prefilled with the prompts by ``add_many`` and extended by each row's accepted path in
the step, so it stays in step with the backbone's rows; with its token input (EAGLE-style) the prefill passes each
prompt's next tokens and first new token, the step each row's accepted tokens and bonus token.

Limits: one acceptance rule per batch (the step is built for it); sampling draws from the one global RNG, so a
sequence's sampled output depends on its batch-mates (greedy output does not); the fast backbone only; static
trees only (a dynamic tree decodes one sequence at a time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from medusa_llama.decode.acceptance import AcceptanceConfig, accept_into, greedy_kernel, next_token, next_token_into
from medusa_llama.decode.backbone import FastBackbone
from medusa_llama.decode.decoder import (
    GenerationConfig,
    GenerationResult,
    StepRunner,
    check_draft_fits,
    pow2_bucket,
    prefill_bucket,
)
from medusa_llama.decode.heads import MedusaHeads
from medusa_llama.decode.model import TreeMask, batched_tree_attention_mask, commit_cache, put_where
from medusa_llama.decode.prefix import BatchedPrefixCache, successors
from medusa_llama.decode.proposal import propose
from medusa_llama.decode.tree import Tree, build_tree
from medusa_llama.errors import MedusaError

PREFILL_TOKENS = 16384
"""Default cap on one batched prefill forward on a GPU: prompts x longest prompt, padding included. It bounds the
forward's activations, its scratch KV cache and its (b, 1, P, P) mask; 64 chat prompts of up to 256 tokens fit in
one. (Its gain on a GPU is not measured yet.)"""

CPU_PREFILL_TOKENS = 512
"""The default cap on a CPU, where a forward is compute- and cache-bound and big ones gain nothing: 64 prompts of
20-200 tokens (``benchmarks/batch_prefill.py``, 2 cores, the embedded model) took 1.3x the one-by-one time under a
cap of 16384, 1.1x under 2048, 0.84x under 512."""

PREFILL_PADDING = 0.25
"""The most padding a prefill group carries, as a fraction of its real tokens: padding is paid in full where the
forward is compute-bound (those 64 prompts in one forward took 2x the one-by-one time on the CPU), while a few
groups instead of one cost a GPU little."""


def prefill_groups(lengths: list[int], budget: int, max_padding: float = PREFILL_PADDING) -> list[list[int]]:
    """Split prompts (their lengths) into groups prefilled by one forward each: indices sorted by length, cut
    wherever the next prompt would take the group's padded size (count x longest) past ``budget`` tokens or its
    padding past ``max_padding`` of its real tokens. A prompt longer than the budget goes alone."""
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0  # the group's real tokens
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = (len(group) + 1) * lengths[i]  # the longest so far is this one: sorted
        if group and (padded > budget or padded > (1 + max_padding) * (real + lengths[i])):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    return [*groups, group] if group else groups


def rows_bucket(count: int, batch_size: int) -> int:
    """The padded row count of a prefill group of ``count`` prompts in the CUDA-graph prefill: the next power of two,
    capped at the batch size (at most log2(B) + 2 row buckets, times ``prefill_bucket``'s token buckets: the graphs)."""
    return pow2_bucket(count, 1, batch_size)


class BatchedBackbone:
    """B cache rows over one ``FastBackbone``'s weights (its own single-sequence cache is left alone).

    The batched counterparts of the backbone's verbs: ``prefill_many(rows, prompts)`` (``prefill(row, tokens)`` is its
    batch of one), ``forward_tree(tokens (B, T), ...)``
    and ``commit(path (B, D+1), n (B,), active (B,))``."""

    def __init__(self, backbone: FastBackbone, batch_size: int):
        if not isinstance(backbone, FastBackbone):
            raise MedusaError("batched decoding needs the fast backbone (--backend fast)")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.model = backbone.model
        self.batch_size = batch_size
        self.device, self.dtype = backbone.device, backbone.dtype
        self.max_seq_len = backbone.max_seq_len
        self.k_cache, self.v_cache = self.model.new_cache(self.max_seq_len, batch_size)  # (L, B, S, n_kv, hd)
        self.cache_len = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (B,)
        self.tree_kernel = backbone.tree_kernel  # tree steps by the Triton kernel, one cache length per row

    @torch.no_grad()
    def prefill(self, row: int, tokens: torch.Tensor) -> torch.Tensor:
        """Run the prompt (P,) into cache row ``row`` alone and commit it. Returns its hidden states (P, D)."""
        return self.prefill_many([row], [tokens])[0]

    @torch.no_grad()
    def prefill_many(self, rows: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        """Run b prompts (each (P_i,) long) into cache rows ``rows`` with ONE forward and commit them. Returns the
        hidden states (b, P, D), P the longest prompt: row i's are real at positions 0 .. P_i-1, garbage after.

        The prompts are right-padded into (b, P) at positions 0 .. P-1. The forward writes a scratch cache of b rows
        and P slots (the free rows need not be contiguous, so no view of the decoder's cache covers them), which is
        then copied into ``rows``; the padding's K/V land past each row's length, where later steps overwrite them
        (as they do rejected tree nodes)."""
        dev, b = self.device, len(rows)
        lengths = torch.tensor([t.shape[0] for t in prompts], device=dev)  # (b,)
        p = max(t.shape[0] for t in prompts)
        tokens = torch.zeros(b, p, dtype=torch.long, device=dev)  # (b, P) right-padded with token 0
        for i, t in enumerate(prompts):
            tokens[i, : t.shape[0]] = t
        hidden, scratch = self._prefill_forward(tokens, lengths)
        index = torch.tensor(rows, device=dev)  # (b,)
        for cache, new in zip((self.k_cache, self.v_cache), scratch, strict=True):
            cache[:, index, :p] = new  # (L, b, P, n_kv, hd) into the rows' first P slots
        self.cache_len[index] = lengths
        return hidden

    @torch.no_grad()
    def prefill_padded(
        self, index: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """``prefill_many`` in tensor-only form, for a CUDA graph over fixed shapes: tokens (R, P) right-padded with
        lengths (R,), into cache rows ``index`` (R,) long; only the rows ``valid`` marks ((R,) bool) are written.
        Returns the hidden states (R, P, D).

        Each valid row writes its first ``lengths`` slots and its length, nothing else; an invalid row (the bucket's
        padding) writes nothing: its row ``index`` names may be another sequence's, which gets its own values back
        (``put_where``)."""
        hidden, scratch = self._prefill_forward(tokens, lengths)
        p = tokens.shape[1]
        keep = valid[:, None] & (torch.arange(p, device=self.device) < lengths[:, None])  # (R, P) real entries
        for cache, new in zip((self.k_cache, self.v_cache), scratch, strict=True):
            put_where(cache, (slice(None), index, slice(0, p)), new, keep[None, :, :, None, None])  # (L, R, P, ...)
        put_where(self.cache_len, index, lengths, valid)
        return hidden

    def _prefill_forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The prefill forward of right-padded prompts: tokens (b, P), lengths (b,) -> hidden states (b, P, D) and
        the scratch cache it wrote ((k, v), each (L, b, P, n_kv, hd)), causal within each row, blind to padding."""
        b, p = tokens.shape
        pos = torch.arange(p, device=self.device)  # (P,) positions, and slots, the same in every row
        causal = pos[None, :] <= pos[:, None]  # (P, P) query i sees keys 0 .. i
        allowed = causal[None] & (pos < lengths[:, None])[:, None, :]  # (b, P, P): ... and no padding key
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min
        )
        scratch = self.model.new_cache(p, b)  # (L, b, P, n_kv, hd) each
        hidden = self.model(tokens, pos.expand(b, p), pos, mask[:, None], cache=scratch)  # (b, P, D)
        return hidden, scratch

    @torch.no_grad()
    def forward_tree(self, tokens: torch.Tensor, tree_mask: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T); tree_mask: (T, T) bool; depth: (T,). Runs row b's tree at slots cache_len[b] + (0..T-1)
        and positions cache_len[b] + depth, without committing. Returns hidden states (B, T, D)."""
        t = tokens.shape[1]
        slots = self.cache_len[:, None] + torch.arange(t, device=self.device)  # (B, T)
        positions = self.cache_len[:, None] + depth  # (B, T)
        if self.tree_kernel:
            mask = TreeMask(self.cache_len, tree_mask.to(torch.int8))  # the kernel reads each row's length itself
            return self.model(tokens, positions, slots, mask, cache=(self.k_cache, self.v_cache))
        # fixed shapes on a GPU (CUDA graphs); on the CPU only the filled slots (reading cache_len costs no sync)
        span = self.max_seq_len if self.device.type == "cuda" else int(self.cache_len.max()) + t
        mask = batched_tree_attention_mask(self.cache_len, tree_mask, span, self.dtype)  # (B, 1, T, span)
        return self.model(tokens, positions, slots, mask, cache=(self.k_cache, self.v_cache))

    @torch.no_grad()
    def commit(self, path: torch.Tensor, n: torch.Tensor, active: torch.Tensor) -> None:
        """Keep row b's tree nodes ``path[b, :n[b]+1]`` as its next cache entries; inactive rows do not advance.

        All D+1 path slots move (fixed shapes); those past the kept ones lie beyond the new cache length."""
        fused = self.model.use_fused_kernels  # the Triton move and advance (``model.commit_cache``)
        commit_cache(self.k_cache, self.v_cache, self.cache_len, path, n, active, fused)


@dataclass
class _Slot:
    """Host-side state of the sequence in one cache row."""

    config: GenerationConfig
    result: GenerationResult
    eos: frozenset[int]
    t0: float
    done: bool = False


class BatchedDecoder:
    """Batched decoding with Medusa heads and a tree, or vanilla decoding (``heads=None``: the tree is the root
    alone, one token per step, the honest baseline). Greedy output equals each sequence's batch-size-1 output.
    ``draft_vocab`` as for ``MedusaDecoder``: None, the heads' stored draft vocabulary if any; N, its first N; 0, none.
    ``prefill_tokens``: the most padded prompt tokens one prefill forward of ``add_many`` takes (``prefill_groups``;
    None: ``PREFILL_TOKENS`` on a GPU, ``CPU_PREFILL_TOKENS`` on a CPU). ``graph_prefill``: prefill each group by one
    CUDA-graph replay of its (rows, tokens) bucket (see the module docstring; only with CUDA graphs; on by default: on
    an H200 at B = 8 the first token fell from 42 to 4.3 ms and batched vanilla / Medusa rose from 2,441 / 3,730 to
    3,016 / 5,623 tokens/s, ``benchmarks/batch_throughput.py --prefill both``; False: the eager grouped prefill).

    Use ``add`` / ``step`` / ``release`` for continuous batching, or ``generate_many`` for a list of prompts.
    """

    def __init__(
        self,
        backbone: FastBackbone,
        batch_size: int,
        heads: MedusaHeads | None = None,
        tree: Tree | list | None = None,
        use_cuda_graphs: bool = True,
        draft_vocab: int | None = None,
        prefill_tokens: int | None = None,
        graph_prefill: bool = True,
    ):
        if prefill_tokens is not None and prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        on_gpu = backbone.device.type == "cuda"
        self.prefill_tokens = prefill_tokens or (PREFILL_TOKENS if on_gpu else CPU_PREFILL_TOKENS)
        self.prefill_padding = PREFILL_PADDING
        self.bb = BatchedBackbone(backbone, batch_size)
        self.backbone = backbone
        self.capacity = batch_size
        dev = backbone.device
        if heads is None:
            tree = build_tree([])
        else:
            heads.check_compatible(backbone.hidden_size, backbone.vocab_size, backbone.name)
            if not isinstance(tree, Tree):
                tree = build_tree(tree if tree is not None else [], heads.num_heads)
            if tree.max_depth > heads.num_heads:
                raise MedusaError(f"the tree is {tree.max_depth} deep but the heads predict only {heads.num_heads}")
            heads = heads.to(device=dev, dtype=backbone.dtype).eval()
        self.heads = heads if tree.size > 1 else None  # a root-only tree runs no heads
        self.draft = None if self.heads is None else self.heads.draft(backbone.lm_head, draft_vocab, backbone.embed)
        if self.draft is not None:
            check_draft_fits(self.draft, max(tree.level_topk))
        self.tree = tree.to(dev)
        b, t, d = batch_size, tree.size, tree.max_depth
        # The prefix layer's KV cache, one row per sequence, for heads with prefix attention (as MedusaDecoder's).
        self.prefix_cache = None
        if self.heads is not None and self.heads.prefix is not None:
            self.prefix_cache = BatchedPrefixCache(
                self.heads.prefix, b, self.bb.max_seq_len, dev, backbone.dtype, self.bb.tree_kernel
            )
        self.root = torch.zeros(b, dtype=torch.long, device=dev)  # (B,) last emitted token, not yet in the cache
        self.hidden = torch.zeros(b, backbone.hidden_size, dtype=backbone.dtype, device=dev)  # (B, D) before root
        self.tokens = torch.zeros(b, t, dtype=torch.long, device=dev)  # (B, T) the candidate trees
        self.active = torch.zeros(b, dtype=torch.bool, device=dev)  # (B,) rows whose cache advances
        self.out = torch.zeros(b, d + 2, dtype=torch.long, device=dev)  # (B, D+2): [n, emitted tokens...] per row
        self.use_graphs = use_cuda_graphs and backbone.supports_cuda_graphs
        # The CUDA-graph prefill (``graph_prefill``): each prefill group padded to a bucket of (rows, tokens)
        # in fixed device buffers, one graph per (bucket, acceptance rule), all in one memory pool (as the
        # single-sequence decoders' prefill graphs). ``padded_prefill`` is on with graphs and ``graph_prefill``; tests
        # turn it on without graphs (the same bucketed function, run eagerly).
        self.padded_prefill = self.use_graphs and graph_prefill
        # Its inputs in one long buffer, so that one host-to-device copy loads a group: [lengths (B) | cache rows (B)
        # | valid flags (B) | tokens (R * P, viewed (R, P))]; the graph of bucket (R, P) reads the first R of each.
        self._pf_in = torch.zeros(3 * b + b * self.bb.max_seq_len, dtype=torch.long, device=dev)
        self._pf_uniform: torch.Tensor | None = None  # (B, V) the sampled first tokens' uniform draws (when sampling)
        self._prefills: dict[tuple[int, int, str], StepRunner] = {}
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._slots: list[_Slot | None] = [None] * b
        self._steps: dict[str, StepRunner] = {}
        self._acfg: AcceptanceConfig | None = None  # the running batch's acceptance rule

    @property
    def kind(self) -> str:
        return "vanilla" if self.heads is None else "medusa"

    def free_rows(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    def running(self) -> list[int]:
        """Rows holding a sequence that has not finished."""
        return [i for i, s in enumerate(self._slots) if s is not None and not s.done]

    def room(self, prompt_len: int) -> int:
        """The most new tokens a sequence with this prompt may ask for (< 1: the prompt does not fit)."""
        return self.bb.max_seq_len - prompt_len - 2 * (self.tree.max_depth + 1) - self.tree.size

    # -- joining and leaving --------------------------------------------------------------------------------------
    def add(self, prompt_ids, config: GenerationConfig | None = None) -> int:
        """Prefill a prompt into a free row and choose its first token: ``add_many`` of one. Returns the row."""
        return self.add_many([prompt_ids], [config or GenerationConfig()])[0]

    @torch.no_grad()
    def add_many(self, prompts: list, configs: GenerationConfig | list[GenerationConfig] | None = None) -> list[int]:
        """Prefill prompts into free rows, one backbone forward per group of ``prefill_groups`` (with the graph
        prefill one graph replay per group, its bucket captured first if new), and choose each one's first token.
        Returns their rows, in prompt order. A sequence may already be done (EOS first, or a budget of one token):
        check ``done(row)``. A refused prompt (MedusaError) refuses the call before any row changes."""
        if not prompts:
            return []
        if not isinstance(configs, list):
            configs = [configs or GenerationConfig()] * len(prompts)
        if len(configs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(configs)} configs")
        acfgs = [cfg.acceptance_config() for cfg in configs]
        acfg = self._acfg if any(s is not None for s in self._slots) else acfgs[0]
        for other in acfgs:
            if other != acfg:
                raise MedusaError(f"this batch runs {acfg}; a sequence asks for {other}")
        free = self.free_rows()
        if not free:
            raise MedusaError(f"all {self.capacity} rows are busy: release one first")
        if len(prompts) > len(free):
            raise MedusaError(f"{len(prompts)} prompts but only {len(free)} free rows (the others are busy)")
        slack = 2 * (self.tree.max_depth + 1) + self.tree.size
        tensors = []  # the prompts (P_i,): on the device; on the host for the bucketed prefill, which packs them there
        for prompt_ids, cfg in zip(prompts, configs, strict=True):
            prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
            if prompt.numel() == 0:
                raise MedusaError("the prompt is empty")
            self.backbone.check_room(prompt.numel(), cfg.max_new_tokens + slack)
            tensors.append(prompt.cpu() if self.padded_prefill else prompt.to(self.bb.device))
        self._acfg = acfg
        step = self._step_for(acfg)
        captured = step.use_graph and step.graph is None
        if captured:  # capture while no row holds a sequence: its runs are harmless
            step.capture()
        rows = free[: len(prompts)]
        groups = prefill_groups([t.shape[0] for t in tensors], self.prefill_tokens, self.prefill_padding)
        if self.padded_prefill:  # capture the groups' prefill graphs before the clock starts, as the step's above
            for group in [g for g in groups if self._bucket(tensors, g, acfg) not in self._prefills]:
                self._padded_prefill_for(rows, tensors, group, acfg)
                captured = True
        if captured and self.bb.device.type == "cuda":
            torch.cuda.synchronize(self.bb.device)  # the captures' warm-up runs must not count as prefill time
        t0 = time.perf_counter()
        index = torch.tensor(rows, device=self.bb.device)  # (b,)
        if self.padded_prefill:
            self._prefill_padded(rows, tensors, groups, configs, acfg)
        else:
            self._prefill(rows, tensors, configs, acfg)
            if self.heads is not None:
                self.tokens[index] = self._propose(index)
        firsts = self.root[index].tolist()  # one host sync for all the new rows
        prefill_s = time.perf_counter() - t0
        for row, cfg, first in zip(rows, configs, firsts, strict=True):
            result = GenerationResult(accepted_per_depth=[0] * self.tree.max_depth)
            result.prefill_s = prefill_s
            result.tokens.append(first)
            result.token_times.append(prefill_s)
            eos = frozenset(self.backbone.eos_token_ids) if cfg.stop_at_eos else frozenset()
            slot = _Slot(cfg, result, eos, t0, done=first in eos or cfg.max_new_tokens == 1)
            self._slots[row] = slot
            self.active[row] = not slot.done
            if slot.done:
                result.total_s = prefill_s
        return rows

    def _prefill(
        self, rows: list[int], prompts: list[torch.Tensor], configs: list[GenerationConfig], acfg: AcceptanceConfig
    ) -> None:
        """Run the prompts into ``rows`` group by group, choose each one's first token (``root``) from h at its last
        prompt token, and set each row's heads input ``hidden``: that h, or the prefix layer's output there (the layer
        run over the row's prompt states once the first tokens are known: its token input reads each position's next
        token, the prompt's next one, and the first new token after the last)."""
        dev = self.bb.device
        last = self.hidden.new_empty(len(rows), self.hidden.shape[1])  # (b, D)
        ran = []  # (group, its rows, prompt lengths, states (g, P, D)) for the prefix layer
        for group in prefill_groups([t.shape[0] for t in prompts], self.prefill_tokens, self.prefill_padding):
            g_rows = [rows[i] for i in group]
            lengths = torch.tensor([prompts[i].shape[0] for i in group], device=dev)  # (g,)
            states = self.bb.prefill_many(g_rows, [prompts[i] for i in group])  # (g, P, D)
            last[torch.tensor(group, device=dev)] = states[torch.arange(len(group), device=dev), lengths - 1]  # (g, D)
            if self.prefix_cache is not None:
                ran.append((group, g_rows, lengths, states))
        index = torch.tensor(rows, device=dev)  # (b,)
        self.root[index] = next_token(self.backbone.logits(last), acfg, self._draws(configs, acfg))  # (b,)
        if self.prefix_cache is None:
            self.hidden[index] = last
        for group, g_rows, lengths, states in ran:
            g_index, next_emb = torch.tensor(g_rows, device=dev), None  # (g,)
            if self.heads.config.prefix_token_input:  # each position's next token: the prompt's, then the root
                padded = pad_sequence([prompts[i] for i in group], batch_first=True)  # (g, P) right-padded with 0
                next_emb = self.backbone.embed(successors(padded, lengths, self.root[g_index]))  # (g, P, D)
            out = self.prefix_cache.prefill_many(g_rows, states, lengths, next_emb)  # (g, P, D)
            self.hidden[g_index] = out[torch.arange(len(group), device=dev), lengths - 1]  # (g, D)

    def _draws(self, configs: list[GenerationConfig], acfg: AcceptanceConfig) -> torch.Tensor | None:
        """The uniform draws (b, V) the new sequences' first tokens are sampled with (``next_token``; None when
        greedy): one draw for all rows, or where a sequence has a seed row by row, each seeded sequence seeding the
        global RNG just before its own draw (as a batch-size-1 decoder seeds before its prefill, which draws nothing).
        Both prefill forms sample with these, the bucketed one outside its graph."""
        if acfg.temperature == 0:
            return None
        shape, dev = (self.backbone.vocab_size,), self.bb.device
        if all(cfg.seed is None for cfg in configs):
            return torch.rand(len(configs), *shape, dtype=torch.float32, device=dev)
        draws = []
        for cfg in configs:
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed)
            draws.append(torch.rand(shape, dtype=torch.float32, device=dev))
        return torch.stack(draws)

    # -- the bucketed (CUDA-graph) prefill ------------------------------------------------------------------------
    def _bucket(self, prompts: list[torch.Tensor], group: list[int], acfg: AcceptanceConfig) -> tuple[int, int, str]:
        """The prefill graph's key for prompts ``group``: (rows, tokens) of its bucket and the acceptance rule."""
        longest = max(prompts[i].shape[0] for i in group)
        return rows_bucket(len(group), self.capacity), prefill_bucket(longest, self.bb.max_seq_len), repr(acfg)

    def _padded_prefill_for(
        self, rows: list[int], prompts: list[torch.Tensor], group: list[int], acfg: AcceptanceConfig
    ) -> StepRunner:
        """The prefill graph of ``group``'s bucket, with the group (its host prompts ``prompts[i]`` for i in
        ``group``, into ``rows[i]``) loaded into the input buffer by one copy. Captured the first time: that runs it
        for real, so call it before the clock starts (a capture writes what the replay then writes again).

        The padding rows: R - g of them (g prompts, R = ``rows_bucket(g, B)``) run a one-token prompt (token 0)
        flagged invalid, aimed at a row outside the group (R <= B and g < R leave one: a free row or another
        running sequence's). Every write of the prefill to the decoder's per-row state (both KV caches and their
        lengths, root, hidden, the proposal) is masked by the flags: an invalid row writes its target row's own
        values back (``put_where``), so that row is left exactly as it was; and since no row of the group is named
        twice, the padding never races a real row's write. Their computation is wasted and harmless, like a free
        row's in a step."""
        b, g = self.capacity, len(group)
        r, p, _ = self._bucket(prompts, group, acfg)
        targets = [rows[i] for i in group]
        spare = next((row for row in range(b) if row not in targets), targets[0])  # any row if g == R: unused
        host = torch.zeros(3 * b + r * p, dtype=torch.long)  # the buffer's layout (see __init__), this bucket's part
        host[:r] = torch.tensor([prompts[i].shape[0] for i in group] + [1] * (r - g))  # lengths
        host[b : b + r] = torch.tensor(targets + [spare] * (r - g))  # cache rows
        host[2 * b : 2 * b + g] = 1  # valid flags
        tokens = host[3 * b :].view(r, p)  # (R, P) right-padded with token 0
        for j, i in enumerate(group):
            tokens[j, : prompts[i].shape[0]] = prompts[i]
        self._pf_in[: host.numel()].copy_(host)
        return self._prefill_runner(r, p, acfg)

    def _prefill_runner(self, r: int, p: int, acfg: AcceptanceConfig) -> StepRunner:
        """The prefill graph of bucket (r, p), captured the first time from the inputs loaded now."""
        key = (r, p, repr(acfg))
        if key not in self._prefills:
            runner = StepRunner(self._make_padded_prefill(r, p, acfg), self.use_graphs, self._prefill_pool)
            runner.capture()
            self._prefills[key] = runner
        return self._prefills[key]

    @torch.no_grad()
    def capture_prefills(self, longest: int, config: GenerationConfig | None = None) -> int:
        """Capture ahead of time (a server's start, a benchmark's warm-up) the prefill graphs of every bucket that
        groups of prompts of up to ``longest`` tokens can meet, for ``config``'s acceptance rule; ``add_many``
        otherwise captures a bucket when it first meets it. Safe at any time: the captures' runs flag every row as
        padding, so they write nothing. Returns how many graphs were captured (0 without ``padded_prefill``)."""
        if not self.padded_prefill:
            return 0
        acfg, b = (config or GenerationConfig()).acceptance_config(), self.capacity
        rows = sorted({rows_bucket(n, b) for n in range(1, b + 1)})
        tokens = sorted(
            {prefill_bucket(n, self.bb.max_seq_len) for n in range(1, min(longest, self.bb.max_seq_len) + 1)}
        )
        before = len(self._prefills)
        self._pf_in[: 3 * b].zero_()
        self._pf_in[:b].fill_(1)  # one-token prompts (token 0) aimed at row 0, all invalid
        for r in rows:
            for p in tokens:
                self._prefill_runner(r, p, acfg)
        return len(self._prefills) - before

    def _prefill_padded(
        self,
        rows: list[int],
        prompts: list[torch.Tensor],
        groups: list[list[int]],
        configs: list[GenerationConfig],
        acfg: AcceptanceConfig,
    ) -> None:
        """``_prefill`` and the first proposal by the bucketed prefill, one graph replay per group (eagerly on a
        CPU: the tests' reference run of the same function). The host's work per group: one input copy (and when
        sampling one copy of its rows' draws, made for all groups at once as ``_prefill`` makes them)."""
        draws = self._draws(configs, acfg)  # (b, V) or None
        for group in groups:
            runner = self._padded_prefill_for(rows, prompts, group, acfg)
            if draws is not None:
                self._pf_uniform[: len(group)].copy_(draws[group])  # (g, V) in the group's row order
            runner()

    def _make_padded_prefill(self, r: int, p: int, acfg: AcceptanceConfig) -> Callable[[], None]:
        """The tensor-only prefill of bucket (``r`` rows, ``p`` tokens) from the input buffer: the backbone's
        prefill, each row's first token, the prefix layer (with its token input), the first proposal; every write
        to the decoder's per-row state masked to the valid rows (see ``_padded_prefill_for``)."""
        b, bk, dev = self.capacity, self.backbone, self.bb.device
        lengths, index, flags = self._pf_in[:r], self._pf_in[b : b + r], self._pf_in[2 * b : 2 * b + r]  # (R,) each
        tokens = self._pf_in[3 * b : 3 * b + r * p].view(r, p)  # (R, P) right-padded with token 0
        if acfg.temperature > 0 and self._pf_uniform is None:
            self._pf_uniform = torch.zeros(b, bk.vocab_size, dtype=torch.float32, device=dev)
        uniform = None if acfg.temperature == 0 else self._pf_uniform[:r]  # (R, V)
        at = torch.arange(r, device=dev)  # (R,) row numbers within the bucket
        pos = torch.arange(p, device=dev)  # (P,)

        def prefill() -> None:
            valid = flags.bool()  # (R,) real rows; the rest is the bucket's padding
            states = self.bb.prefill_padded(index, tokens, lengths, valid)  # (R, P, D)
            last = states[at, lengths - 1]  # (R, D) each row's h at its last prompt token
            root = next_token(bk.logits(last), acfg, uniform)  # (R,) first tokens
            put_where(self.root, index, root, valid)
            hidden = last  # (R, D) the heads' input
            if self.prefix_cache is not None:
                next_emb = None
                if self.heads.config.prefix_token_input:  # each position's next token: the prompt's, then the root
                    next_emb = bk.embed(successors(tokens, lengths, root))  # (R, P, D)
                keep = valid[:, None] & (pos < lengths[:, None])  # (R, P) the real entries of the real rows
                out = self.prefix_cache.prefill_many(index, states, lengths, next_emb, keep)  # (R, P, D)
                hidden = out[at, lengths - 1]  # (R, D)
            put_where(self.hidden, index, hidden, valid[:, None])
            if self.heads is not None:  # the first proposal from the bucket's own rows (the padding's is garbage)
                proposal = self._propose_from(hidden, root)  # (R, T)
                put_where(self.tokens, index, proposal, valid[:, None])

        return prefill

    def done(self, row: int) -> bool:
        slot = self._slots[row]
        return slot is None or slot.done

    def result(self, row: int) -> GenerationResult:
        """The result so far of the sequence in ``row``."""
        slot = self._slots[row]
        if slot is None:
            raise MedusaError(f"row {row} holds no sequence")
        return slot.result

    def release(self, row: int) -> GenerationResult:
        """Free ``row`` (finished or not: a cancelled sequence is released as it stands). Returns its result."""
        slot = self._slots[row]
        if slot is None:
            raise MedusaError(f"row {row} holds no sequence")
        self._slots[row] = None
        self.active[row] = False
        return slot.result

    # -- stepping ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> dict[int, list[int]]:
        """One batched decode step. Returns each running row's new tokens; rows that finish are marked done (their
        cache stops advancing) but keep their result until ``release``."""
        rows = self.running()
        if not rows:
            return {}
        self._step_for(self._acfg)()
        out = self.out.tolist()  # one host sync per step: (B, D+2)
        now = time.perf_counter()
        new_tokens: dict[int, list[int]] = {}
        for row in rows:
            slot = self._slots[row]
            res, cfg = slot.result, slot.config
            n, new = out[row][0], out[row][1 : out[row][0] + 2]
            res.steps += 1
            for d in range(n):
                res.accepted_per_depth[d] += 1
            new = new[: cfg.max_new_tokens - len(res.tokens)]
            for i, tok in enumerate(new):
                if tok in slot.eos:
                    new, slot.done = new[: i + 1], True
                    break
            res.tokens.extend(new)
            res.token_times.extend([now - slot.t0] * len(new))
            slot.done = slot.done or len(res.tokens) >= cfg.max_new_tokens
            if slot.done:
                res.total_s = now - slot.t0
                self.active[row] = False
            new_tokens[row] = new
        return new_tokens

    @torch.no_grad()
    def generate_many(
        self,
        prompts: list,
        configs: GenerationConfig | list[GenerationConfig] | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt, at most ``capacity`` at a time: a finished sequence's row is refilled with the
        next waiting prompt before the next step. ``on_tokens(i, tokens)`` gets prompt i's new tokens."""
        if not isinstance(configs, list):
            configs = [configs or GenerationConfig()] * len(prompts)
        results: list[GenerationResult | None] = [None] * len(prompts)
        owner: dict[int, int] = {}  # row -> prompt index
        waiting = list(range(len(prompts)))
        while waiting or owner:
            taken, waiting = waiting[: len(self.free_rows())], waiting[len(self.free_rows()) :]
            rows = self.add_many([prompts[i] for i in taken], [configs[i] for i in taken])
            for i, row in zip(taken, rows, strict=True):
                owner[row] = i
                if on_tokens:
                    on_tokens(i, list(self._slots[row].result.tokens))
            for row, new in self.step().items():
                if on_tokens:
                    on_tokens(owner[row], new)
            for row in [r for r in owner if self.done(r)]:
                results[owner.pop(row)] = self.release(row)
        return results

    def _step_for(self, cfg: AcceptanceConfig) -> StepRunner:
        key = repr(cfg)
        if key not in self._steps:
            fn = self._medusa_step(cfg) if self.heads is not None else self._vanilla_step(cfg)
            self._steps[key] = StepRunner(fn, self.use_graphs)
        return self._steps[key]

    def _propose_from(self, hidden: torch.Tensor, root: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(b, T): the trees of b rows from their hidden states (b, D) and roots (b,), the heads run once for all
        (into ``out`` where given); on the GPU path with the heads' fused kernel, as ``MedusaDecoder``."""
        bb = self.backbone
        return propose(self.heads, hidden, root, self.tree, bb.embed, bb.lm_head, self.draft, self.bb.tree_kernel, out)

    def _propose(self, index: torch.Tensor) -> torch.Tensor:
        """(b, T): the trees of rows ``index`` ((b,) long) from their hidden states and roots, the heads run once."""
        return self._propose_from(self.hidden[index], self.root[index])

    def _vanilla_step(self, cfg: AcceptanceConfig) -> Callable[[], None]:
        """Forward each row's root alone, commit it, choose each row's next token."""
        tree, zeros = self.tree, torch.zeros(self.capacity, dtype=torch.long, device=self.bb.device)
        kernel = self.bb.tree_kernel
        fp32 = not greedy_kernel(cfg, kernel)  # the greedy kernels read the LM head's bf16 logits as they are

        def step() -> None:
            hidden = self.bb.forward_tree(self.root[:, None], tree.mask, tree.depth)  # (B, 1, D)
            next_token_into(self.backbone.logits(hidden[:, 0], fp32), cfg, self.root, self.out, kernel)  # (B,) roots
            self.bb.commit(zeros[:, None], zeros, self.active)
            self.hidden.copy_(hidden[:, 0])
            self.out[:, 0] = 0

        return step

    def _medusa_step(self, cfg: AcceptanceConfig) -> Callable[[], None]:
        """Verify every row's tree in one forward, accept and compact per row, run the heads once for all rows."""
        tree = self.tree
        rows = torch.arange(self.capacity, device=self.bb.device)  # (B,)
        fp32 = not greedy_kernel(cfg, self.bb.tree_kernel)  # the greedy kernels read bf16 logits as they are

        def step() -> None:
            hidden = self.bb.forward_tree(self.tokens, tree.mask, tree.depth)  # (B, T, D)
            logits = self.backbone.logits(hidden, fp32)  # (B, T, V)
            # out[b] = [n, accepted tokens, bonus token, ...]; root[b] = the bonus token (the old root is read first)
            path = accept_into(logits, self.tokens, tree, cfg, self.out, self.root, self.bb.tree_kernel)  # (B, D+1)
            n, emitted = self.out[:, 0], self.out[:, 1:]  # (B,), (B, D+1)
            self.bb.commit(path, n, self.active)
            if self.prefix_cache is None:
                last = path.gather(1, n[:, None])[:, 0]  # (B,) node of each row's last accepted token
                self.hidden.copy_(hidden[rows, last])  # (B, D)
            else:  # each row's accepted path (root + n nodes) joins its prefix-layer row; inactive rows stay put
                # each path token's next one: the next accepted token, then the bonus token (its token input)
                next_emb = self.backbone.embed(emitted) if self.heads.config.prefix_token_input else None  # (B, D+1, D)
                kept = self.prefix_cache.extend(hidden[rows[:, None], path], (n + 1) * self.active, next_emb)
                self.hidden.copy_(kept[rows, n])  # (B, D) the layer's output at each row's last accepted token
            self._propose_from(self.hidden, self.root, self.tokens)

        return step
