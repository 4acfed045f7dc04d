"""The LM head and the greedy argmax in one launch (``lm_head.argmax_linear``; on a CPU through Triton's interpreter):
its keys equal ``kernels.argmax_keys`` of ``F.linear``'s logits (ties, signed zeros, NaN and infinities included),
and greedy decoding on the GPU path gives the same tokens with it (``lm_head.FUSED_ARGMAX``) as without."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FakeTokenizer
from test_decoding import TIE_PROMPTS, OracleHeads, tied_llama
from test_prefix import kernel_device

from medusa_llama.decode import lm_head, proposal
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.tree import builtin_tree

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL_TILES = dict(BLOCK_N=32, BLOCK_K=16, BLOCK_M_MAX=16)
"""Tiles that give every test shape several programs of columns and of rows, and K tiles with a partial last one."""


def reference_keys(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The unfused path's key of each row: ``argmax_keys`` of the logits, reduced over its chunks."""
    from medusa_llama.decode.kernels import argmax_keys

    return argmax_keys(F.linear(h, w)).amax(-1, keepdim=True)


def dyadic(shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/8 in [-1, 1]: every product and partial sum of a row of D <= 64 is exact in fp32, so every
    summation order gives the same fp32 logits (and the same rounding to bf16 / fp16, ties to even included: many
    rounded logits tie)."""
    return (torch.randint(-8, 9, shape, generator=gen) / 8).to(kernel_device(), dtype)


def columns(keys: torch.Tensor) -> list[int]:
    return ((keys[..., 0] & 0x7FFFFFFF) ^ 0x7FFFFFFF).tolist()


def check(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``argmax_linear``'s keys: (T, 1) int64, equal to the unfused path's, their columns ``torch.argmax``'s."""
    keys = lm_head.argmax_linear(h, w)
    assert keys.shape == (*h.shape[:-1], 1) and keys.dtype == torch.long
    assert torch.equal(keys, reference_keys(h, w))
    assert columns(keys) == F.linear(h, w).float().argmax(-1).tolist()
    return keys


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("t,d,v", [(1, 40, 300), (3, 64, 1000), (17, 40, 257), (17, 64, 129)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_equal_argmax_keys_of_the_logits(dtype, t, d, v, tiles, monkeypatch):
    """Random exact (dyadic) inputs, V no multiple of a column block, D = 40 (a partial K tile), T = 17 (a partial
    row block); planted ties of the last row's maximum within one column block and across blocks (the lowest column
    wins); a row of zeros (every logit +-0.0: column 0). ``small``: many programs of each kind."""
    if tiles == "small":
        for name, value in SMALL_TILES.items():
            monkeypatch.setattr(lm_head, name, value)
    g = torch.Generator().manual_seed(t * 1000 + v)
    h, w = dyadic((t, d), g, dtype), dyadic((v, d), g, dtype)
    w[[5, 9, v - 2]] = torch.where(h[-1] >= 0, 1.0, -1.0).to(dtype)  # the last row's largest logit: sum |h|
    h[0] = 0
    w[0] = -1  # column 0's logit of the zero row: -0.0 in a product of signed zeros, +0.0 elsewhere
    keys = check(h, w)
    assert columns(keys)[0] == 0 and (t == 1 or columns(keys)[-1] == 5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on NaN and overflow: as meant
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_wins_first_and_infinities_order(dtype, monkeypatch):
    """A NaN in a weight row makes its column NaN in every row, a NaN in a hidden row every column of it: the first
    NaN wins (``torch.argmax``), across column blocks too. Logits that overflow (in the fp32 sum, or in the rounding
    to fp16) are +-inf: two +inf columns tie to the lower."""
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(lm_head, name, value)
    g = torch.Generator().manual_seed(7)
    h, w = dyadic((3, 40), g, dtype), dyadic((200, 40), g, dtype)
    w[90, 0] = w[20, 3] = float("nan")
    h[1, 5] = float("nan")
    assert columns(check(h, w)) == [20, 0, 20]
    big = torch.finfo(dtype).max / 8  # a sum of 40: beyond fp32 (bf16, fp32) or fp16's range (fp16)
    h = torch.ones(3, 40, device=h.device, dtype=dtype)
    h[1] = -1
    h[2, ::2] = 0.5
    w[[20, 90], [3, 0]] = 0.25
    w[[33, 34]] = big
    w[50] = -big
    assert columns(check(h, w)) == [33, 50, 33]


def test_bad_shapes_are_refused():
    dev = kernel_device()
    with pytest.raises(ValueError, match="against a weight"):
        lm_head.argmax_linear(torch.zeros(2, 8, device=dev), torch.zeros(5, 9, device=dev))
    with pytest.raises(ValueError, match="against a weight"):
        lm_head.argmax_linear(torch.zeros(2, 8, device=dev), torch.zeros(5, 8, device=dev, dtype=torch.float16))
    assert lm_head.argmax_linear(torch.zeros(0, 8, device=dev), torch.zeros(5, 8, device=dev)).shape == (0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tree_name", [None, "tree16"])
def test_greedy_decoding_with_the_fused_lm_head_equals_it_without(one_thread, dtype, tree_name, monkeypatch):
    """Greedy decoding on the GPU path (the step's kernels, interpreted), ``FUSED_ARGMAX`` on and off: the same tokens
    and accepted lengths, for ``VanillaDecoder`` (None) and a tree whose oracle heads have the rank-0 chain of the
    unfused vanilla decoding right. ``tied_llama``'s tied columns (c in 40..63 and c + 32) lie in different column
    blocks of 32: the atomic max breaks their ties to the lower column. fp32 also equals the PyTorch path, and the
    tree accepts candidates."""
    kernel_device()
    monkeypatch.setattr(proposal, "propose", lambda heads, *args: heads.propose(*args))  # the oracle proposes
    monkeypatch.setattr(lm_head, "BLOCK_N", 32)
    monkeypatch.setattr(lm_head, "FUSED_MIN_ROWS", 1)  # the vanilla step's one row too (by default cuBLAS's)
    calls = [0]
    fused = lm_head.argmax_linear

    def counted(*args):
        calls[0] += 1
        return fused(*args)

    monkeypatch.setattr(lm_head, "argmax_linear", counted)
    bb = make_backbone(tied_llama(dtype), FakeTokenizer(), "tiny", 256, "fast")
    bb.tree_kernel = bb.model.use_fused_kernels = True
    reference = make_backbone(tied_llama(dtype), FakeTokenizer(), "tiny", 256, "fast")  # the PyTorch path
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    for prompt in TIE_PROMPTS:
        monkeypatch.setattr(lm_head, "FUSED_ARGMAX", False)
        answer = VanillaDecoder(bb).generate(prompt, cfg).tokens
        runs = []
        for on in (False, True):
            monkeypatch.setattr(lm_head, "FUSED_ARGMAX", on)
            torch.manual_seed(0)  # the oracle's wrong candidates are random: the same ones in both runs
            if tree_name is None:
                dec = VanillaDecoder(bb)
            else:
                dec = MedusaDecoder(bb, OracleHeads(bb, len(prompt), answer), builtin_tree(tree_name))
            out = dec.generate(prompt, cfg)
            runs.append((out.tokens, out.accepted_per_depth, out.steps))
        assert runs[0] == runs[1]
        if dtype == torch.float32:
            assert answer == VanillaDecoder(reference).generate(prompt, cfg).tokens == runs[1][0]
            assert runs[1][2] < len(answer) - 1 or tree_name is None  # the tree's candidates were accepted
    assert calls[0] > 0


def test_greedy_logits_fuses_from_fused_min_rows(monkeypatch):
    """``Backbone.greedy_logits``: the fused keys (..., 1) for ``FUSED_MIN_ROWS`` rows or more, the LM head's logits
    (..., V) below (the vanilla step's one row), for a hidden size above ``FUSED_MAX_HIDDEN`` and everywhere with
    ``FUSED_ARGMAX`` off."""
    kernel_device()
    bb = make_backbone(tied_llama(torch.float32), FakeTokenizer(), "tiny", 256, "fast")
    vocab = bb.lm_head.weight.shape[0]
    hidden = bb.lm_head.weight.shape[1]
    cases = ((1, True, hidden, vocab), (2, True, hidden, 1), (5, True, hidden, 1), (5, False, hidden, vocab))
    for rows, on, widest, width in cases + ((5, True, hidden - 1, vocab),):  # a head wider than FUSED_MAX_HIDDEN
        monkeypatch.setattr(lm_head, "FUSED_ARGMAX", on)
        monkeypatch.setattr(lm_head, "FUSED_MAX_HIDDEN", widest)
        out = bb.greedy_logits(torch.randn(rows, bb.lm_head.weight.shape[1]))
        assert out.shape == (rows, width)
        assert (out.dtype == torch.long) == (width == 1)
