"""Batched decoding reproduces batch-size-1 decoding token for token: prompts of different lengths, sequences that
finish at different times, rows refilled mid-run (continuous batching), both head kinds, a couple of trees, heads
with prefix attention."""

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode import proposal
from medusa_llama.decode.acceptance import AcceptanceConfig, accept
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.batch import PREFILL_TOKENS, BatchedDecoder, prefill_groups
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.model import batched_tree_attention_mask, tree_attention_mask
from medusa_llama.decode.tree import build_tree, builtin_tree
from medusa_llama.errors import MedusaError

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PREFIX = dict(prefix_attention=True, prefix_num_heads=4)  # the kernel tests: compiled on a GPU, interpreted on a CPU
BUDGETS = (40, 12, 33, 25, 7)  # different budgets: sequences finish at different steps, rows are refilled


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, "fast")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 17, 30, 9, 23)]


def configs():
    return [GenerationConfig(max_new_tokens=m, stop_at_eos=False) for m in BUDGETS]


def test_batched_mask_rows_equal_the_single_mask():
    tree = build_tree(builtin_tree("tree16"))
    cache_len = torch.tensor([0, 7, 30])
    mask = batched_tree_attention_mask(cache_len, tree.mask, 64, torch.float32)  # (3, 1, T, 64)
    for b in range(3):
        assert torch.equal(mask[b : b + 1], tree_attention_mask(cache_len[b], tree.mask, 64, torch.float32))


@pytest.mark.parametrize("tree_name", ["chain", "tree16"])
@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_batched_proposal_and_acceptance_equal_single_rows(backbone, kind, tree_name):
    torch.manual_seed(1)
    heads, tree = random_heads(kind), build_tree(builtin_tree(tree_name))
    hidden, root = torch.randn(4, 64), torch.randint(0, 96, (4,))
    embed, lm_head = backbone.embed, backbone.lm_head
    tokens = proposal.propose(heads, hidden, root, tree, embed, lm_head)  # (4, T): a leading batch dimension
    for b in range(4):
        assert torch.equal(tokens[b], proposal.propose(heads, hidden[b], root[b], tree, embed, lm_head))
    logits = torch.randn(4, tree.size, 96)
    logits[..., 5] += 8.0  # token 5 wins everywhere, so trees holding 5 accept long paths
    tokens[:, 1::2] = 5
    path, n, bonus = accept(logits, tokens, tree, AcceptanceConfig())  # (4, D+1), (4,), (4,)
    assert n.max() > 0
    for b in range(4):
        ref = accept(logits[b], tokens[b], tree, AcceptanceConfig())
        assert torch.equal(path[b], ref[0]) and n[b] == ref[1] and bonus[b] == ref[2]


@pytest.mark.parametrize("tree_name", ["chain", "tree16"])
@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_batched_medusa_equals_single(one_thread, backbone, prompts, kind, tree_name):
    heads, tree = random_heads(kind), builtin_tree(tree_name)
    single = MedusaDecoder(backbone, heads, tree)
    refs = [single.generate(p, c).tokens for p, c in zip(prompts, configs(), strict=True)]
    results = BatchedDecoder(backbone, 3, heads, tree).generate_many(prompts, configs())
    assert [r.tokens for r in results] == refs
    for r, m in zip(results, BUDGETS, strict=True):
        assert len(r.tokens) == m
        # first token + one bonus per step + accepted candidates, less what the budget cut from the last step
        assert r.steps + 1 <= len(r.tokens) <= 1 + r.steps + sum(r.accepted_per_depth)


def test_batched_vanilla_equals_single(one_thread, backbone, prompts):
    single = VanillaDecoder(backbone)
    refs = [single.generate(p, c).tokens for p, c in zip(prompts, configs(), strict=True)]
    results = BatchedDecoder(backbone, 2, heads=None).generate_many(prompts, configs())
    assert [r.tokens for r in results] == refs
    assert all(r.steps == len(r.tokens) - 1 for r in results)  # one token per step


def test_release_mid_run_and_refill(one_thread, backbone, prompts):
    """A sequence released unfinished (a cancelled request) frees its row for a new prompt; the others go on."""
    heads, tree = random_heads("sequential"), builtin_tree("tree16")
    cfg = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    single = MedusaDecoder(backbone, heads, tree)
    refs = [single.generate(p, cfg).tokens for p in prompts[:3]]
    dec = BatchedDecoder(backbone, 2, heads, tree)
    a, b = dec.add(prompts[0], cfg), dec.add(prompts[1], cfg)
    with pytest.raises(MedusaError, match="busy"):
        dec.add(prompts[2], cfg)
    for _ in range(2):
        dec.step()
    partial = dec.release(b).tokens
    assert partial == refs[1][: len(partial)]
    c = dec.add(prompts[2], cfg)
    assert c == b
    while dec.running():
        dec.step()
    assert dec.release(a).tokens == refs[0]
    assert dec.release(c).tokens == refs[2]


def test_stops_at_eos_per_sequence(one_thread, prompts):
    hf = tiny_llama()
    free = VanillaDecoder(make_backbone(hf, FakeTokenizer(), "tiny", 256, "fast")).generate(
        prompts[1], GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    )
    tok = FakeTokenizer()
    tok.eos_token_id = free.tokens[6]
    bb = make_backbone(hf, tok, "tiny", 256, "fast")
    heads, tree = random_heads("medusa"), builtin_tree("tree16")
    cfg = GenerationConfig(max_new_tokens=40)
    single = MedusaDecoder(bb, heads, tree)
    refs = [single.generate(p, cfg).tokens for p in prompts]
    for dec in (BatchedDecoder(bb, 3, heads, tree), BatchedDecoder(bb, 3)):
        assert [r.tokens for r in dec.generate_many(prompts, cfg)] == refs
    assert refs[1][-1] == tok.eos_token_id and len(refs[1]) <= 7


def test_bad_inputs_are_refused(backbone):
    dec = BatchedDecoder(backbone, 2, random_heads(), builtin_tree("chain"))
    with pytest.raises(MedusaError, match="exceeds the context"):
        dec.add(list(range(90)) * 3, GenerationConfig(max_new_tokens=10))
    with pytest.raises(MedusaError, match="empty"):
        dec.add([], GenerationConfig())
    with pytest.raises(ValueError, match="--batch-size"):
        BatchedDecoder(backbone, 0)
    hf_backbone = make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, "hf")
    with pytest.raises(MedusaError, match="fast backbone"):
        BatchedDecoder(hf_backbone, 2)


def test_tree_attention_kernel_per_sequence_cache_len():
    """The Triton kernel (the CPU interpreter here) with one cache length per sequence equals SDPA row by row."""
    attention = pytest.importorskip("medusa_llama.decode.attention")
    if type(attention._split_kernel).__name__ != "InterpretedFunction" and not torch.cuda.is_available():
        pytest.skip("Triton was imported before conftest set TRITON_INTERPRET=1")
    torch.manual_seed(0)
    t, nh, n_kv, hd, s = 5, 4, 2, 16, 320
    for lens in ([3, 150], [0, 77, 260]):
        b = len(lens)
        cache_len = torch.tensor(lens, device=DEV)
        q = torch.randn(b, t, nh, hd, device=DEV)
        k_cache, v_cache = torch.randn(b, s, n_kv, hd, device=DEV), torch.randn(b, s, n_kv, hd, device=DEV)
        for row, n in enumerate(lens):  # slots past each row's tree must never be read
            k_cache[row, n + t :] = v_cache[row, n + t :] = float("nan")
        mask = ((torch.rand(t, t) < 0.3) | torch.eye(t, dtype=torch.bool)).tril().to(DEV)
        out = attention.tree_attention(q, k_cache, v_cache, cache_len, mask)  # (B, T, nh, hd)
        for row, n in enumerate(lens):
            span = n + t
            ref = attention.tree_attention_sdpa(
                q[row : row + 1].double(),
                k_cache[row : row + 1, :span].double(),
                v_cache[row : row + 1, :span].double(),
                cache_len[row],
                mask,
            )
            torch.testing.assert_close(out[row : row + 1].double(), ref, rtol=1e-5, atol=1e-5)
        k, v = k_cache.nan_to_num().double(), v_cache.nan_to_num().double()  # SDPA reads (masked) dead slots
        batched_ref = attention.tree_attention_sdpa(q.double(), k, v, cache_len, mask)  # the (B,) reference path
        torch.testing.assert_close(out.double(), batched_ref, rtol=1e-5, atol=1e-5)


def test_batched_backbone_kernel_path_equals_pytorch_path(one_thread):
    """The batched verify forward with the tree-attention kernel (rows at different lengths) against SDPA, fp32."""
    pytest.importorskip("medusa_llama.decode.attention")
    bb = make_backbone(tiny_llama(seed=2).to(DEV), FakeTokenizer(), "tiny", 160, "fast")
    tree = build_tree(builtin_tree("tree16")).to(DEV)
    tokens = torch.randint(0, 96, (3, tree.size), device=DEV)
    outs = []
    for on in (False, True):
        batched = BatchedDecoder(backbone=bb, batch_size=3).bb
        batched.tree_kernel = on
        for row, n in enumerate((7, 40, 21)):
            batched.prefill(row, torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)).to(DEV))
        outs.append(bb.logits(batched.forward_tree(tokens, tree.mask, tree.depth)))  # (3, T, V)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the compiled kernels need a GPU")
def test_batched_cuda_graph_steps_equal_single_on_gpu(prompts):
    """On a GPU: captured batched steps (one graph per tree), kernel attention with per-row lengths, fp32."""
    bb = make_backbone(tiny_llama().cuda(), FakeTokenizer(), "tiny", 256, "fast")
    assert bb.supports_cuda_graphs and bb.tree_kernel
    tree16 = builtin_tree("tree16")
    for heads, tree in ((random_heads("sequential"), tree16), (prefix_heads(), tree16), (None, None)):
        single = MedusaDecoder(bb, heads, tree) if heads is not None else VanillaDecoder(bb)
        refs = [single.generate(p, c).tokens for p, c in zip(prompts, configs(), strict=True)]
        dec = BatchedDecoder(bb, 3, heads, tree)
        assert [r.tokens for r in dec.generate_many(prompts, configs())] == refs
        assert all(step.graph is not None for step in dec._steps.values())
        if dec.prefix_cache is not None:
            assert torch.equal(dec.prefix_cache.lengths, dec.bb.cache_len)


def prefix_heads(kind: str = "sequential", token_input: bool = False):
    return random_heads(kind, std=0.3, prefix_token_input=token_input, **PREFIX)


@pytest.mark.parametrize("token_input", [False, True])
@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_batched_prefix_heads_equal_single(one_thread, backbone, prompts, kind, token_input):
    """Heads with prefix attention (and its token input): the rows' outputs and acceptance equal batch-size-1
    decoding; rows are refilled."""
    heads, tree = prefix_heads(kind, token_input), builtin_tree("tree16")
    single = MedusaDecoder(backbone, heads, tree)
    refs = [single.generate(p, c) for p, c in zip(prompts, configs(), strict=True)]
    dec = BatchedDecoder(backbone, 3, heads, tree)
    results = dec.generate_many(prompts, configs())
    assert [r.tokens for r in results] == [r.tokens for r in refs]
    assert [r.accepted_per_depth for r in results] == [r.accepted_per_depth for r in refs]  # the same proposals
    assert dec.prefix_cache is not None and torch.equal(dec.prefix_cache.lengths, dec.bb.cache_len)


@pytest.mark.parametrize("token_input", [False, True])
def test_batched_prefix_rows_equal_the_training_form(one_thread, backbone, prompts, token_input):
    """Each running row's heads input is the prefix layer over its committed sequence (a row refilled mid-run too),
    with the token input given each committed token's successor; a finished row left in place while the others step
    does not advance; per-row lengths equal the backbone's."""
    heads, tree = prefix_heads(token_input=token_input), builtin_tree("tree16")
    dec = BatchedDecoder(backbone, 3, heads, tree)
    long, short = GenerationConfig(max_new_tokens=40, stop_at_eos=False), GenerationConfig(max_new_tokens=4)
    held = {dec.add(prompts[0], long): prompts[0], dec.add(prompts[1], long): prompts[1]}
    for _ in range(3):
        dec.step()
    dec.release(1)
    del held[1]
    held[dec.add(prompts[2], long)] = prompts[2]  # refills row 1
    assert dec.add(prompts[3], short) == 2  # finishes within a few steps, then stays held while the others step
    while not dec.done(2):
        dec.step()
    finished = int(dec.prefix_cache.lengths[2])
    for _ in range(3):
        dec.step()
    assert not dec.done(0) and not dec.done(1) and int(dec.prefix_cache.lengths[2]) == finished
    assert torch.equal(dec.prefix_cache.lengths, dec.bb.cache_len)
    for row, prompt in held.items():
        expected = training_form_input(backbone, dec.heads, prompt + dec.result(row).tokens, int(dec.bb.cache_len[row]))
        torch.testing.assert_close(dec.hidden[row], expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def training_form_input(backbone, heads, ids: list[int], committed: int) -> torch.Tensor:
    """The training form's heads input at the last of the ``committed`` first tokens of ``ids``: the prefix layer over
    their hidden states, its token input (if any) reading each one's successor in ``ids`` (the root after the last)."""
    hidden = backbone.hf_model.model(input_ids=torch.tensor([ids[:committed]])).last_hidden_state  # (1, L, D)
    next_emb = backbone.hf_model.get_input_embeddings()(torch.tensor([ids[1 : committed + 1]]))  # (1, L, D)
    return heads.head_inputs(hidden, next_emb)[0, -1]


def test_root_only_tree_runs_no_prefix_heads(backbone):
    vanilla = BatchedDecoder(backbone, 2, prefix_heads(), [], use_cuda_graphs=False)  # a root-only tree runs no heads
    assert vanilla.heads is None and vanilla.prefix_cache is None


# -- batched prefill: add_many ----------------------------------------------------------------------------------------


def decode_all(dec: BatchedDecoder, prompts, cfgs, together: bool) -> tuple[list[list[int]], int]:
    """Decode every prompt, refilling rows between steps once two are free (or the last prompts wait): by one
    ``add_many`` (``together``) or by ``add`` one at a time. Checks each new row's cache lengths. Returns the tokens
    and the most prompts one refill took after the first."""
    results, owner, waiting, most = {}, {}, list(range(len(prompts))), 0
    while waiting or owner:
        free = dec.free_rows()
        if waiting and len(free) >= min(2, len(waiting)):
            take, waiting = waiting[: len(free)], waiting[len(free) :]
            if together:
                rows = dec.add_many([prompts[i] for i in take], [cfgs[i] for i in take])
            else:
                rows = [dec.add(prompts[i], cfgs[i]) for i in take]
            most = max(most, len(take)) if owner else most
            for i, row in zip(take, rows, strict=True):
                assert int(dec.bb.cache_len[row]) == len(prompts[i])
                if dec.prefix_cache is not None:
                    assert int(dec.prefix_cache.lengths[row]) == len(prompts[i])
                owner[row] = i
        dec.step()
        for row in [r for r in owner if dec.done(r)]:
            results[owner.pop(row)] = dec.release(row).tokens
    return [results[i] for i in range(len(prompts))], most


@pytest.mark.parametrize("budget", [PREFILL_TOKENS, 40])  # any padding in one forward; or several groups of <= 40
@pytest.mark.parametrize("heads", ["vanilla", "tree", "prefix", "prefix_token"])
def test_add_many_equals_adding_one_by_one_and_single(one_thread, backbone, prompts, heads, budget):
    """Prompts of different lengths prefilled together, rows refilled mid-run two at a time: the same tokens as adding
    them one by one and as batch-size-1 decoding; each row's cache lengths are its prompt's."""
    if heads == "vanilla":
        made, tree, single = None, None, VanillaDecoder(backbone)
    else:
        made = random_heads("sequential") if heads == "tree" else prefix_heads(token_input=heads == "prefix_token")
        tree = builtin_tree("tree16")
        single = MedusaDecoder(backbone, made, tree)
    cfgs = [GenerationConfig(max_new_tokens=m, stop_at_eos=False) for m in (30, 6, 8, 20, 12)]
    refs = [single.generate(p, c).tokens for p, c in zip(prompts, cfgs, strict=True)]
    one_by_one, _ = decode_all(BatchedDecoder(backbone, 3, made, tree), prompts, cfgs, together=False)
    dec = BatchedDecoder(backbone, 3, made, tree, prefill_tokens=budget)
    dec.prefill_padding = 10.0 if budget == PREFILL_TOKENS else dec.prefill_padding
    together, most = decode_all(dec, prompts, cfgs, together=True)
    assert together == one_by_one == refs
    assert most == 2  # a mid-run refill prefilled two prompts in one add_many


def test_add_many_rows_equal_one_row_prefills(one_thread, backbone, prompts):
    """The batched prefill's states, cache entries and heads inputs equal one-row prefills, row by row."""
    heads, tree = prefix_heads(), builtin_tree("tree16")
    together = BatchedDecoder(backbone, 4, heads, tree, prefill_tokens=PREFILL_TOKENS)
    together.prefill_padding = 10.0  # the three prompts (5, 17, 30 tokens) in one forward
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    together.add(prompts[4], cfg)  # row 0 busy: the new prompts go to rows 1 .. 3
    assert together.add_many(prompts[:3], cfg) == [1, 2, 3]
    for row, prompt in zip((1, 2, 3), prompts[:3], strict=True):
        ref = BatchedDecoder(backbone, 1, heads, tree)
        ref.add(prompt, cfg)
        n = len(prompt)
        assert int(together.bb.cache_len[row]) == int(together.prefix_cache.lengths[row]) == n
        for mine, theirs in ((together.bb.k_cache, ref.bb.k_cache), (together.bb.v_cache, ref.bb.v_cache)):
            torch.testing.assert_close(mine[:, row, :n], theirs[:, 0, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.prefix_cache.k[row, :n], ref.prefix_cache.k[0, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.hidden[row], ref.hidden[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(together.tokens[row], ref.tokens[0]) and together.root[row] == ref.root[0]


def test_prefill_groups_keep_the_token_budget():
    lengths = [20, 200, 35, 180, 90, 21, 150, 60]
    for budget in (10_000, 400, 150):
        groups = prefill_groups(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every prompt once
        for g in groups:
            padded, real = len(g) * max(lengths[i] for i in g), sum(lengths[i] for i in g)
            assert len(g) == 1 or (padded <= budget and padded <= 1.25 * real)  # a long prompt alone may pass
    assert prefill_groups(lengths, 10_000) == [[0, 5], [2], [7, 4], [6, 3, 1]]  # similar lengths together
    assert prefill_groups(lengths, 10_000, max_padding=10.0) == [sorted(range(8), key=lengths.__getitem__)]
    assert prefill_groups([], 100) == []


def test_add_many_refuses_before_changing_anything(backbone, prompts):
    dec = BatchedDecoder(backbone, 3, random_heads(), builtin_tree("chain"))
    row = dec.add(prompts[0], GenerationConfig(max_new_tokens=5))
    lengths = dec.bb.cache_len.clone()
    for bad, match in (
        ([prompts[1], []], "empty"),
        ([prompts[1], prompts[2], prompts[3]], "busy"),
        ([prompts[1], list(range(90)) * 3], "exceeds the context"),
    ):
        with pytest.raises(MedusaError, match=match):
            dec.add_many(bad, GenerationConfig(max_new_tokens=10))
        assert dec.free_rows() == [1, 2] and torch.equal(dec.bb.cache_len, lengths)
    sampled = GenerationConfig(max_new_tokens=5, temperature=0.7)
    with pytest.raises(MedusaError, match="this batch runs"):
        dec.add_many([prompts[1], prompts[2]], [GenerationConfig(max_new_tokens=5), sampled])
    assert dec.add_many([], None) == [] and dec.running() == [row]
