"""The batched decoder's CUDA-graph prefill in its bucketed form (each prefill group padded to (rows, tokens) buckets in
fixed buffers, padding rows aimed at another row and masked) decodes exactly as the eager grouped prefill. On a GPU it
runs as graph replays (``graph_prefill=True``); here the same function runs eagerly (``padded_prefill``)."""

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.batch import BatchedDecoder, rows_bucket
from medusa_llama.decode.decoder import GenerationConfig, VanillaDecoder
from medusa_llama.decode.tree import builtin_tree

CONTEXT = 400  # not a power of two: a 260-token prompt's bucket is capped at the context
LENGTHS = (5, 6, 7, 70, 260, 17, 9)  # 5, 6, 7 join as one group of 3 (a bucket of 4 rows); buckets 64, 128, 400
BUDGETS = (20, 12, 16, 9, 14, 11, 18)
HEADS = {
    "vanilla": None,
    "sequential": lambda: random_heads("sequential"),
    "prefix": lambda: random_heads("sequential", prefix_attention=True, prefix_num_heads=4),
    "prefix_token": lambda: random_heads(
        "sequential", prefix_attention=True, prefix_num_heads=4, prefix_token_input=True
    ),
}


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", CONTEXT, "fast")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in LENGTHS]


def configs():
    return [GenerationConfig(max_new_tokens=m, stop_at_eos=False) for m in BUDGETS]


@pytest.fixture(scope="module")
def refs(backbone, prompts):
    """Batch-size-1 greedy output (vanilla: every greedy decoder's output equals it)."""
    single = VanillaDecoder(backbone)
    return [single.generate(p, c).tokens for p, c in zip(prompts, configs(), strict=True)]


def decoder(backbone, heads: str, padded: bool, batch_size: int = 4) -> BatchedDecoder:
    dec = BatchedDecoder(backbone, batch_size, HEADS[heads]() if HEADS[heads] else None, builtin_tree("tree16"))
    dec.padded_prefill = padded
    return dec


def test_rows_buckets_are_powers_of_two_capped_at_the_batch():
    assert [rows_bucket(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert [rows_bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]


def test_graph_prefill_needs_graphs(backbone):
    assert not BatchedDecoder(backbone, 2).padded_prefill  # on by default, but no CUDA graphs on a CPU
    assert not BatchedDecoder(backbone, 2, graph_prefill=True).padded_prefill


@pytest.mark.parametrize("heads", list(HEADS))
def test_padded_prefill_decodes_as_batch_size_one(one_thread, backbone, prompts, refs, heads):
    """Rows refilled as sequences finish (continuous batching): groups of 3 (padded to 4 rows), 1 and 2 prompts."""
    dec = decoder(backbone, heads, padded=True)
    assert [r.tokens for r in dec.generate_many(prompts, configs())] == refs
    assert (4, 64) in {key[:2] for key in dec._prefills}  # the group of 3 ran with a padding row
    assert (1, CONTEXT) in {key[:2] for key in dec._prefills}  # the capped bucket


def state(dec: BatchedDecoder, row: int) -> list[torch.Tensor]:
    """Everything the decoder keeps for ``row``."""
    out = [dec.bb.k_cache[:, row], dec.bb.v_cache[:, row], dec.bb.cache_len[row], dec.root[row], dec.hidden[row]]
    out += [dec.tokens[row], dec.active[row]]
    if dec.prefix_cache is not None:
        out += [dec.prefix_cache.k[row], dec.prefix_cache.v[row], dec.prefix_cache.lengths[row]]
    return [t.clone() for t in out]


@pytest.mark.parametrize("heads", list(HEADS))
def test_padded_prefill_state_equals_the_eager_one(one_thread, backbone, prompts, refs, heads):
    """A running sequence, then a group of 3 joining (padded to 4 rows: the padding row is aimed at the running
    sequence's row), then decoding on: the running row is untouched bit for bit, the new rows hold what the eager
    prefill leaves, and every sequence decodes as batch-size-1."""
    decs = {padded: decoder(backbone, heads, padded) for padded in (False, True)}
    for dec in decs.values():
        assert dec.add(prompts[3], configs()[3]) == 0  # row 0: 70 tokens
        dec.step()
        dec.step()
    before = state(decs[True], 0)
    for dec in decs.values():
        assert dec.add_many(prompts[:3], configs()[:3]) == [1, 2, 3]  # one group of 3: bucket (4, 64)
    assert {key[:2] for key in decs[True]._prefills} == {(1, 128), (4, 64)}
    after = state(decs[True], 0)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    eager, padded = decs[False], decs[True]
    rows = torch.tensor([1, 2, 3])
    assert torch.equal(padded.root[rows], eager.root[rows])
    assert torch.equal(padded.bb.cache_len, eager.bb.cache_len)
    torch.testing.assert_close(padded.hidden[rows], eager.hidden[rows], rtol=1e-5, atol=1e-5)
    if heads != "vanilla":
        assert torch.equal(padded.tokens[rows], eager.tokens[rows])  # the same first proposals
    for row, n in zip(rows.tolist(), LENGTHS[:3], strict=True):  # the caches' real entries
        torch.testing.assert_close(padded.bb.k_cache[:, row, :n], eager.bb.k_cache[:, row, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded.bb.v_cache[:, row, :n], eager.bb.v_cache[:, row, :n], rtol=1e-5, atol=1e-5)
        if padded.prefix_cache is not None:
            torch.testing.assert_close(padded.prefix_cache.k[row, :n], eager.prefix_cache.k[row, :n])
            assert int(padded.prefix_cache.lengths[row]) == n
    while padded.running():
        padded.step()
    got = [padded.release(row).tokens for row in range(4)]
    assert got == [refs[3], *refs[:3]]


def test_capturing_every_bucket_ahead_writes_nothing(one_thread, backbone, prompts):
    """``capture_prefills`` runs every bucket with all rows flagged padding: no row changes (run eagerly here)."""
    dec = decoder(backbone, "prefix_token", padded=True)
    dec.add_many([prompts[0], prompts[3]], configs()[:2])
    dec.step()
    before = [state(dec, row) for row in range(4)]
    assert dec.capture_prefills(70) == 4  # rows 1, 2, 4 x tokens 64, 128, less (1, 64) and (1, 128) met by add_many
    assert len(dec._prefills) == 6
    for runner in dec._prefills.values():
        runner.fn()
    after = [state(dec, row) for row in range(4)]
    assert all(torch.equal(a, b) for x, y in zip(before, after, strict=True) for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("seeds", [(None, None, None), (11, None, 12)])
def test_padded_prefill_samples_the_eager_first_tokens(one_thread, backbone, prompts, seeds):
    """Sampled first tokens: both forms draw the same uniforms (``_draws``, outside the graph) for the same rows."""
    cfgs = [GenerationConfig(max_new_tokens=2, temperature=0.9, seed=s, stop_at_eos=False) for s in seeds]
    firsts = {}
    for padded in (False, True):
        dec = decoder(backbone, "sequential", padded)
        torch.manual_seed(3)
        rows = dec.add_many([prompts[0], prompts[3], prompts[1]], cfgs)  # groups [5, 6] and [70]
        firsts[padded] = [dec.result(r).tokens[0] for r in rows]
    assert firsts[True] == firsts[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("heads", list(HEADS))
def test_graph_prefill_on_gpu_decodes_as_batch_size_one(prompts, heads):
    bb = make_backbone(tiny_llama().cuda(), FakeTokenizer(), "tiny", CONTEXT, "fast")
    refs = [VanillaDecoder(bb).generate(p, c).tokens for p, c in zip(prompts, configs(), strict=True)]
    h = HEADS[heads]() if HEADS[heads] else None
    dec = BatchedDecoder(bb, 4, h, builtin_tree("tree16"), graph_prefill=True)
    assert dec.padded_prefill
    for _ in range(2):  # the second run replays the captured graphs
        assert [r.tokens for r in dec.generate_many(prompts, configs())] == refs
