"""The decoders: a vanilla one-token-per-step decoder (the honest baseline) and the Medusa tree decoder.

Both run on a ``Backbone`` and share the loop: prefill, then steps until EOS or the token budget. A step is a
tensor-only function that leaves its results in fixed buffers, so on a GPU the whole step (heads, verify
forward, acceptance, KV compaction) is one CUDA-graph replay and the host reads back one small tensor.

Medusa step (Cai et al., 2024, Sec. 2): the heads fill the tree from the last accepted hidden state; one forward
verifies every node under the tree mask; the acceptance rule picks a path; its KV entries are compacted into
place; the backbone's prediction after the path is the bonus token, the next tree's root. A tree of the root alone
is vanilla decoding: the tree optimizer picks it where no tree pays for its extra work. Heads with prefix attention
(``prefix.py``) read the prefix layer's output instead of the last hidden state: the decoder keeps that layer's KV
cache, filled from the prompt's hidden states at prefill and from the accepted path's after each step.

``profile`` times the phases of a step (``PHASES``) in a separate eager pass, to show where a step's time goes.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from medusa_llama.decode import acceptance, dynamic_tree, proposal
from medusa_llama.decode.acceptance import (
    AcceptanceConfig,
    accept_into,
    accept_move_into,
    greedy_kernel,
    next_token,
    next_token_into,
    pick,
)
from medusa_llama.decode.backbone import Backbone
from medusa_llama.decode.dynamic_tree import DynamicTree, StepTree
from medusa_llama.decode.heads import DraftVocab, MedusaHeads
from medusa_llama.decode.prefix import PrefixCache, successors
from medusa_llama.decode.tree import Tree, build_tree
from medusa_llama.errors import MedusaError

log = logging.getLogger(__name__)

PHASES = ("verify_forward", "lm_head", "acceptance", "proposal", "commit")
"""The phases of a decode step, in the order ``profile`` reports them: the backbone's forward over the tree (one
token for vanilla decoding), the LM head over its nodes, the acceptance rule, the heads' next proposal (with the
prefix layer's cache update; none for vanilla decoding) and the KV commit with the step's bookkeeping."""

Mark = Callable[[str], None]
"""Called with a phase's name when that phase of a step ends (profiling only)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    """Token budget (generation also stops at EOS)."""
    temperature: float = 0.0
    """0: greedy. > 0: sampling from softmax(logits / temperature)."""
    acceptance: str = "auto"
    """greedy | typical | sampling, or auto: greedy at temperature 0, else sampling (both lossless)."""
    typical_epsilon: float = 0.09
    """Typical acceptance threshold epsilon (Medusa's default)."""
    typical_delta: float = 0.3
    """Typical acceptance entropy factor delta (Medusa's default)."""
    seed: int | None = None
    """Seed for sampling; None leaves the RNG as it is."""
    stop_at_eos: bool = True
    """Stop at the model's EOS token (kept in the output)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        self.acceptance_config()  # the rule and temperature are checked once, here

    def acceptance_config(self) -> AcceptanceConfig:
        rule = self.acceptance
        if rule == "auto":
            rule = "greedy" if self.temperature == 0 else "sampling"
        return AcceptanceConfig(rule, self.temperature, self.typical_epsilon, self.typical_delta)


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    """New tokens (EOS included when reached)."""
    steps: int = 0
    """Decode steps after the prefill (the prefill's token is not counted as a step)."""
    accepted_per_depth: list[int] = field(default_factory=list)
    """accepted_per_depth[d-1]: steps whose accepted path reached tree depth d."""
    token_times: list[float] = field(default_factory=list)
    """Seconds from the start of generate() at which each new token was available."""
    prefill_s: float = 0.0
    """Time to first token."""
    total_s: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens per decode step, bonus token counted (1.0 for vanilla decoding)."""
        return (len(self.tokens) - 1) / self.steps if self.steps else 1.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.total_s if self.total_s else 0.0


class StepRunner:
    """Runs a tensor-only step function eagerly, or as a CUDA graph replay once captured.

    ``pool``: a memory pool (``torch.cuda.graph_pool_handle()``) to share with other runners whose graphs never run
    at the same time and keep nothing in their pool between replays (the prefill graphs of one decoder)."""

    def __init__(self, fn: Callable[[], None], use_graph: bool, pool=None):
        self.fn, self.use_graph, self.graph, self.pool = fn, use_graph, None, pool

    def capture(self) -> None:
        """Warm up and capture. Runs ``fn`` for real: call it before prefill, while the cache holds nothing."""
        if not self.use_graph or self.graph is not None:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing: collecting another decoder's unreachable graph would reset it
        # mid-capture, which CUDA refuses ("operation not permitted when stream is capturing"; seen on an H200
        # when a benchmark built decoders one after another). torch.cuda.graph collects once before it starts.
        enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.fn()
        finally:
            if enabled:
                gc.enable()

    def __call__(self) -> None:
        self.graph.replay() if self.graph is not None else self.fn()


class _Decoder:
    """The loop shared by both decoders: prefill, steps, stopping, statistics."""

    def __init__(self, backbone: Backbone, use_cuda_graphs: bool = True, compile: bool = False):
        self.backbone = backbone
        self.use_graphs = use_cuda_graphs and backbone.supports_cuda_graphs
        self.compile = compile  # torch.compile the step (fuses the small elementwise kernels; slow first call)
        # The GPU path (the backbone's Triton kernels): the greedy rule's kernels too (and the heads', MedusaDecoder).
        self.kernel = getattr(backbone, "tree_kernel", False)
        dev = backbone.device
        self.root = torch.zeros((), dtype=torch.long, device=dev)  # last emitted token, not yet in the cache
        self.hidden = torch.zeros(backbone.hidden_size, dtype=backbone.dtype, device=dev)  # heads' input before root
        self._one = torch.ones(1, 1, dtype=torch.bool, device=dev)  # the one-token step's tree: mask (1, 1) ...
        self._zero = torch.zeros(1, dtype=torch.long, device=dev)  # ... depth (1,), and its path to commit
        self._steps: dict[str, StepRunner] = {}
        # The CUDA-graph prefill: prompts padded to a bucket (prefill_bucket) in a fixed buffer, the real length on
        # the device; one graph per (bucket, acceptance config), all in one memory pool. ``padded_prefill`` is on
        # with graphs; tests turn it on without them (the same padded function, run eagerly).
        self.padded_prefill = self.use_graphs
        self._prompt = torch.zeros(backbone.max_seq_len, dtype=torch.long, device=dev)
        self._prompt_len = torch.zeros((), dtype=torch.long, device=dev)
        self._prefills: dict[tuple[int, str], StepRunner] = {}
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # Subclasses set _depth (max tree depth), _tree_size and self.out ([n, emitted tokens...]) and implement
    # _make_step(cfg, mark) (a tensor-only step writing self.out; ``mark`` is for profiling) and
    # _after_prefill(states, tokens, length), given the prompt's hidden states (P, D) and tokens (P,), of which the
    # first ``length`` (None: all; else a 0-d device tensor) are the prompt's and the rest padding. Both run inside
    # CUDA graphs on a GPU.
    def _step_for(self, cfg: AcceptanceConfig) -> StepRunner:
        key = repr(cfg)
        if key not in self._steps:
            fn = self._make_step(cfg)
            if self.compile:
                fn = torch.compile(fn, dynamic=False)
            self._steps[key] = StepRunner(fn, self.use_graphs)
        return self._steps[key]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids,
        config: GenerationConfig | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate from ``prompt_ids`` (list of ints or (P,) tensor). ``on_tokens`` gets each step's new tokens."""
        cfg = config or GenerationConfig()
        acfg = cfg.acceptance_config()
        bb = self.backbone
        prompt = self._checked_prompt(prompt_ids, cfg.max_new_tokens)
        step = self._step_for(acfg)
        if step.use_graph and step.graph is None:
            bb.reset()
            step.capture()
        if self.padded_prefill:  # capture this prompt's prefill graph before the clock starts, as the step's above
            self._prefill_for(prompt, acfg)
        if cfg.seed is not None:  # after the capture, whose warm-up draws random numbers
            torch.manual_seed(cfg.seed)
        result = GenerationResult(accepted_per_depth=[0] * self._depth)
        _sync(bb.device)
        t0 = time.perf_counter()
        self._prefill(prompt, acfg)
        self._stepped = False  # (host-side: the prefill and the steps may be graph replays)
        first = int(self.root)
        result.prefill_s = time.perf_counter() - t0
        result.tokens.append(first)
        result.token_times.append(result.prefill_s)
        if on_tokens:
            on_tokens([first])
        eos = set(bb.eos_token_ids) if cfg.stop_at_eos else set()
        done = first in eos
        while not done and len(result.tokens) < cfg.max_new_tokens:
            step()
            self._stepped = True
            out = self.out.tolist()  # one host sync per step: [n, token_1 .. token_{D+1}]
            n, new = out[0], out[1 : out[0] + 2]
            result.steps += 1
            for d in range(n):
                result.accepted_per_depth[d] += 1
            new = new[: cfg.max_new_tokens - len(result.tokens)]
            for i, tok in enumerate(new):
                if tok in eos:
                    new, done = new[: i + 1], True
                    break
            now = time.perf_counter() - t0
            result.tokens.extend(new)
            result.token_times.extend([now] * len(new))
            if on_tokens:
                on_tokens(new)
        result.total_s = time.perf_counter() - t0
        return result

    def _checked_prompt(self, prompt_ids, new_tokens: int) -> torch.Tensor:
        """The prompt as a (P,) tensor on the device, checked to leave room for ``new_tokens`` and one tree."""
        bb = self.backbone
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=bb.device).flatten()
        if prompt.numel() == 0:
            raise MedusaError("the prompt is empty")
        bb.check_room(prompt.numel(), new_tokens + 2 * (self._depth + 1) + self._tree_size)
        return prompt

    def _prefill(self, prompt: torch.Tensor, cfg: AcceptanceConfig) -> None:
        """Run the prompt (P,), choose the first new token (the root) and make the first proposal.

        On a GPU this is a CUDA-graph replay: eagerly, the prefill's ~800 small kernels cost ~60 us of host time
        each on an H200's host (50-80 ms for 4-10 ms of GPU work, ``benchmarks/step_profile.py``)."""
        if self.padded_prefill:
            self._prefill_for(prompt, cfg)()
        else:
            self._finish_prefill(self.backbone.prefill(prompt), prompt, None, cfg)

    def _finish_prefill(
        self, states: torch.Tensor, tokens: torch.Tensor, length: torch.Tensor | None, cfg: AcceptanceConfig
    ) -> None:
        """From the prompt's hidden states (P, D) (the first ``length`` real, or all for None): the heads' input,
        the first new token (the root) and ``_after_prefill``. Tensor-only: the graph prefill runs it too."""
        last = states[-1] if length is None else pick(states, length - 1)  # (D,)
        self.hidden.copy_(last)
        self.root.copy_(next_token(self.backbone.logits(last), cfg))
        self._after_prefill(states, tokens, length)

    def _prefill_for(self, prompt: torch.Tensor, cfg: AcceptanceConfig) -> StepRunner:
        """The prefill graph for ``prompt``'s bucket, with ``prompt`` loaded into its input buffer (captured the
        first time: that runs the prefill for real, so call it before the clock starts)."""
        p = prompt.numel()
        size = prefill_bucket(p, self.backbone.max_seq_len)
        self._prompt[:p].copy_(prompt)
        self._prompt[p:size].zero_()  # padding: any token does; zeros keep replays reproducible
        self._prompt_len.fill_(p)
        key = (size, repr(cfg))
        if key not in self._prefills:
            runner = StepRunner(self._make_prefill(size, cfg), self.use_graphs, self._prefill_pool)
            runner.capture()
            self._prefills[key] = runner
        return self._prefills[key]

    def _make_prefill(self, size: int, cfg: AcceptanceConfig) -> Callable[[], None]:
        """The tensor-only prefill of the first ``self._prompt_len`` tokens of ``self._prompt[:size]``."""
        bb, tokens, length = self.backbone, self._prompt[:size], self._prompt_len

        def prefill() -> None:
            self._finish_prefill(bb.prefill(tokens, length), tokens, length, cfg)  # states (size, D)

        return prefill

    @torch.no_grad()
    def profile(self, prompt_ids, config: GenerationConfig | None = None, steps: int = 8) -> dict[str, float]:
        """Milliseconds per decode step spent in each of ``PHASES``, and their sum as ``total``: the median over
        ``steps`` steps after prefilling ``prompt_ids``. EOS does not stop the steps.

        A separate measuring pass, not the timed generation: the step runs eagerly (no CUDA graph, no torch.compile)
        and every phase ends with a device synchronisation and a clock read. So on a GPU the phases add up to more
        than a graph replay of the whole step costs; their proportions are what this shows.
        """
        if steps < 1:
            raise ValueError(f"profile steps must be >= 1, got {steps}")
        cfg = config or GenerationConfig()
        acfg = cfg.acceptance_config()
        bb = self.backbone
        prompt = self._checked_prompt(prompt_ids, steps * (self._depth + 1))
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        times: dict[str, list[float]] = {phase: [] for phase in PHASES}
        clock = [0.0]

        def mark(phase: str) -> None:
            _sync(bb.device)
            now = time.perf_counter()
            times[phase].append(now - clock[0])
            clock[0] = now

        step = self._make_step(acfg, mark)
        self._prefill(prompt, acfg)
        for _ in range(steps):
            _sync(bb.device)
            clock[0] = time.perf_counter()
            step()
        ms = {phase: 1e3 * statistics.median(t) if t else 0.0 for phase, t in times.items()}
        return {**ms, "total": sum(ms.values())}

    def _one_token_step(self, cfg: AcceptanceConfig, mark: Mark | None = None) -> Callable[[], None]:
        """Vanilla decoding's step: forward the root alone, choose the next token (the root and ``out[1]``), commit the
        old root."""
        bb = self.backbone
        fp32 = not greedy_kernel(cfg, self.kernel)  # the greedy kernels read the LM head's bf16 logits as they are

        def step() -> None:
            hidden = bb.forward_tree(self.root.view(1), self._one, self._zero)  # (1, D)
            if mark:
                mark("verify_forward")
            logits = bb.logits(hidden[0]) if fp32 else bb.greedy_logits(hidden[0])  # (V,), or its argmax keys (1,)
            if mark:
                mark("lm_head")
            next_token_into(logits, cfg, self.root, self.out, self.kernel)  # the root has been read: overwrite it
            if mark:
                mark("acceptance")
            bb.commit(self._zero, self._zero[0])
            if mark:
                mark("commit")

        return step


class VanillaDecoder(_Decoder):
    """One token per forward: greedy or sampled. The baseline Medusa is measured against."""

    _depth = 0
    _tree_size = 1

    def __init__(self, backbone: Backbone, use_cuda_graphs: bool = True, compile: bool = False):
        super().__init__(backbone, use_cuda_graphs, compile)
        self.out = torch.zeros(2, dtype=torch.long, device=backbone.device)  # [n = 0, next token]

    def _after_prefill(self, states: torch.Tensor, tokens: torch.Tensor, length: torch.Tensor | None) -> None:
        pass

    def _make_step(self, cfg: AcceptanceConfig, mark: Mark | None = None):
        return self._one_token_step(cfg, mark)


class MedusaDecoder(_Decoder):
    """Tree decoding with Medusa heads. Greedy acceptance reproduces the backbone's greedy output exactly.

    A tree of the root alone (``[]``) decodes exactly as ``VanillaDecoder``, at its cost: the heads are not run.
    A ``DynamicTree`` shapes each step's tree from the heads' confidences (``dynamic_tree.py``): ``self.tree`` is then
    a ``StepTree`` whose buffers each proposal overwrites.

    ``draft_vocab``: propose from a draft vocabulary (FR-Spec, ``heads.DraftVocab``): None, the heads' stored one if
    they have one; N, its first N tokens; 0, the full vocabulary. Its rows of the LM head are taken once, here.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: MedusaHeads,
        tree: Tree | DynamicTree | list,
        use_cuda_graphs: bool = True,
        compile: bool = False,
        draft_vocab: int | None = None,
    ):
        super().__init__(backbone, use_cuda_graphs, compile)
        heads.check_compatible(backbone.hidden_size, backbone.vocab_size, backbone.name)
        self.dynamic = tree if isinstance(tree, DynamicTree) else None
        if self.dynamic is not None:
            tree = StepTree.star(self.dynamic)
        elif not isinstance(tree, Tree):
            tree = build_tree(tree, heads.num_heads)
        if tree.max_depth > heads.num_heads:
            raise MedusaError(f"the tree is {tree.max_depth} deep but the heads predict only {heads.num_heads} tokens")
        self.heads = heads.to(device=backbone.device, dtype=backbone.dtype).eval()
        self.draft = None if tree.size == 1 else self.heads.draft(backbone.lm_head, draft_vocab, backbone.embed)
        if self.draft is not None:
            check_draft_fits(self.draft, self.dynamic.topk if self.dynamic is not None else max(tree.level_topk))
        self.tree = tree.to(backbone.device)
        self._depth = tree.max_depth
        self._tree_size = tree.size
        self.tokens = torch.zeros(tree.size, dtype=torch.long, device=backbone.device)  # the current candidates
        self.out = torch.zeros(tree.max_depth + 2, dtype=torch.long, device=backbone.device)  # [n, emitted...]
        # The prefix layer's KV cache, for heads with prefix attention (a root-only tree runs no heads: none).
        self.prefix_cache = None
        if self.heads.prefix is not None and tree.size > 1:
            self.prefix_cache = PrefixCache(
                self.heads.prefix,
                backbone.max_seq_len,
                backbone.device,
                backbone.dtype,
                self.kernel,
            )
        # The decode step's extend by one kernel for its inputs (PrefixCache.extend_path): on a fused cache, whose
        # token input (if any) reads a plain embedding table (``_path_table``: that table, None without the input).
        embed = backbone.embed
        token_input = self.heads.config.prefix_token_input
        fused = self.prefix_cache is not None and self.prefix_cache.fused
        self._path_inputs = fused and (proposal.plain_embedding(embed) or not token_input)
        self._path_table = embed.weight if self._path_inputs and token_input else None
        # The step's proposal reads the prefix layer's row n itself (no copy into ``self.hidden`` first)
        self._stepped, self._rows = False, None
        self._state_row = (
            self.prefix_cache is not None
            and self.dynamic is None
            and proposal.reads_state_row(self.heads, self.tree, embed, self.draft, self.kernel)
        )

    def heads_input(self) -> torch.Tensor:
        """(D,): what the heads read at the last accepted token. ``self.hidden``, but after a step whose proposal
        read the prefix layer's row n in place (``_state_row``) that row of the step's output (host sync)."""
        if self._state_row and self._stepped:
            return self._rows[int(self.out[0])]
        return self.hidden

    def propose(self, rows: torch.Tensor | None = None) -> None:
        """Fill ``self.tokens`` (the candidate tree) from ``self.hidden`` and ``self.root`` with the heads.
        ``rows`` (``_state_row`` only): the step's prefix-layer output instead, whose row n (``self.out[0]``) the
        heads read in place."""
        bb = self.backbone
        if self.dynamic is not None:
            tokens, tree = dynamic_tree.propose(
                self.heads, self.hidden, self.root, self.dynamic, bb.embed, bb.lm_head, self.draft
            )
            self.tokens.copy_(tokens)
            self.tree.copy_(tree)
            return
        row = {} if rows is None else {"state_row": self.out[:1]}
        proposal.propose(
            self.heads, self.hidden if rows is None else rows, self.root, self.tree, bb.embed, bb.lm_head, self.draft,
            self.kernel, self.tokens, **row,
        )  # fmt: skip

    def _after_prefill(self, states: torch.Tensor, tokens: torch.Tensor, length: torch.Tensor | None) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.reset()
            # The token input reads each prompt token's successor: the prompt's next token, the root after the last.
            real = tokens.new_tensor(tokens.shape[0]) if length is None else length
            after = successors(tokens, real, self.root)  # (P,)
            rows = self.prefix_cache.extend(states, length, self._next_emb(after))  # the layer, positions 0..P-1
            self.hidden.copy_(rows[-1] if length is None else pick(rows, length - 1))
        if self.tree.size > 1:
            self.propose()

    def _next_emb(self, successors: torch.Tensor) -> torch.Tensor | None:
        """The prefix layer's token input (EAGLE-style, ``prefix.py``): the embeddings of the tokens that follow the
        rows it is extended by, ``successors`` (n,) -> (n, D); None for a layer without it."""
        return self.backbone.embed(successors) if self.heads.config.prefix_token_input else None

    def _make_step(self, cfg: AcceptanceConfig, mark: Mark | None = None):
        if self.tree.size == 1:  # the root alone: vanilla decoding
            return self._one_token_step(cfg, mark)
        bb, tree = self.backbone, self.tree
        fp32 = not greedy_kernel(cfg, self.kernel)  # the greedy kernels read the LM head's bf16 logits as they are
        # The acceptance, the backbone's KV move and the prefix layer's inputs in one launch (on the kernel path,
        # where the backbone's commit is the Triton move and advance): ``acceptance.FUSED_ACCEPT``
        fused = acceptance.FUSED_ACCEPT and not fp32 and self._path_inputs and bb.model.use_fused_kernels

        def step() -> None:
            hidden = bb.forward_tree(self.tokens, tree.mask, tree.depth)  # (T, D)
            if mark:
                mark("verify_forward")
            logits = bb.logits(hidden) if fp32 else bb.greedy_logits(hidden)  # (T, V), or its argmax keys (T, 1)
            if mark:
                mark("lm_head")
            # out = [n, accepted tokens, bonus token, ...]; root = the bonus token; path (D+1,) clamped
            n, emitted = self.out[0], self.out[1:]  # 0-d, (D+1,)
            if fused:  # the path's K/V already moved: the commit of the root alone below only advances
                pc, caches = self.prefix_cache, (bb.model.k_cache, bb.model.v_cache, bb.cache_len)
                path, inputs = accept_move_into(
                    logits, self.tokens, tree, self.out, self.root, caches, hidden, self._path_table, pc.rope_table,
                    pc.lengths,
                )  # fmt: skip
            else:
                path, inputs = accept_into(logits, self.tokens, tree, cfg, self.out, self.root, self.kernel), None
            if mark:
                mark("acceptance")
            bb.commit(self._zero if fused else path, n)
            if self.prefix_cache is None:
                _take_row(hidden, pick(path, n), self.hidden)
            if mark:
                mark("commit")
            if self.prefix_cache is not None:  # the accepted path (root + n nodes) joins the prefix layer's cache
                # its tokens' successors (the token input): the next accepted token, the bonus token after the last
                if not self._path_inputs:
                    rows = self.prefix_cache.extend(hidden[path], n + 1, self._next_emb(emitted))  # (D+1, D)
                else:  # the same with its inputs made in one launch (by the acceptance's where ``fused``)
                    rows = self.prefix_cache.extend_path(hidden, path, self.out[:1], emitted, self._path_table, inputs)
                if self._state_row:  # the heads read row n of rows themselves (past n: padding)
                    self._rows = rows  # (a graph's output buffer when captured: replays refill it)
                else:
                    _take_row(rows, n, self.hidden)
            self.propose(self._rows if self._state_row else None)
            if mark:
                mark("proposal")

        return step


def _take_row(x: torch.Tensor, i: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = x[i]`` for a 0-d index tensor, in one op and without a host sync: x (n, D), out (D,)."""
    torch.index_select(x, 0, i.view(1), out=out.view(1, -1))


def check_draft_fits(draft: DraftVocab, topk: int) -> None:
    """A tree's widest top-k must fit in the draft vocabulary."""
    if draft.size < topk:
        raise MedusaError(f"--draft-vocab {draft.size} is smaller than the tree's top-{topk}")


PREFILL_MIN_BUCKET = 64
"""The smallest padded prompt size of the CUDA-graph prefill; buckets double from here up to the context."""


def prefill_bucket(length: int, max_seq_len: int) -> int:
    """The padded size a prompt of ``length`` tokens is prefilled at: the next power of two >= PREFILL_MIN_BUCKET
    (at most log2(context / 64) + 1 graphs per decoder), capped at the context ``max_seq_len``."""
    return pow2_bucket(length, PREFILL_MIN_BUCKET, max_seq_len)


def pow2_bucket(n: int, smallest: int, cap: int) -> int:
    """The smallest power-of-two multiple of ``smallest`` that is >= ``n``, capped at ``cap``: the padded sizes of the
    CUDA-graph prefills (few sizes, so few graphs)."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, cap)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
