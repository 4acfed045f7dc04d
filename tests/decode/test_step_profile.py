"""The step profile (time per phase of a decode step), the root-only tree (vanilla decoding) and the CPU linears."""

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode import proposal
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.cpu_linear import PackedLinear, pack_for_cpu
from medusa_llama.decode.decoder import PHASES, GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.tree import builtin_tree

GREEDY = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
PROMPT = [4, 8, 15, 16, 23, 42]


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, "fast")


def test_profile_times_every_phase(backbone):
    medusa = MedusaDecoder(backbone, random_heads(), builtin_tree("tree16")).profile(PROMPT, GREEDY, steps=4)
    vanilla = VanillaDecoder(backbone).profile(PROMPT, GREEDY, steps=4)
    assert list(medusa) == [*PHASES, "total"] and list(vanilla) == [*PHASES, "total"]
    assert all(medusa[p] > 0 for p in PHASES)
    assert vanilla["proposal"] == 0.0 and all(vanilla[p] > 0 for p in PHASES if p != "proposal")
    for prof in (medusa, vanilla):
        assert prof["total"] == pytest.approx(sum(prof[p] for p in PHASES))


def test_profile_leaves_generation_unchanged(backbone):
    dec = MedusaDecoder(backbone, random_heads("medusa"), builtin_tree("tree32"))
    before = dec.generate(PROMPT, GREEDY).tokens
    dec.profile(PROMPT, GREEDY, steps=3)
    assert dec.generate(PROMPT, GREEDY).tokens == before == VanillaDecoder(backbone).generate(PROMPT, GREEDY).tokens
    with pytest.raises(ValueError, match="steps"):
        dec.profile(PROMPT, GREEDY, steps=0)


def test_root_only_tree_is_vanilla_decoding(backbone, monkeypatch):
    def no_heads(*args):
        raise AssertionError("a root-only tree must not run the heads")

    monkeypatch.setattr(proposal, "propose", no_heads)
    dec = MedusaDecoder(backbone, random_heads(), [])
    out = dec.generate(PROMPT, GREEDY)
    assert out.tokens == VanillaDecoder(backbone).generate(PROMPT, GREEDY).tokens
    assert out.steps == len(out.tokens) - 1 and out.mean_accepted == 1.0 and out.accepted_per_depth == []
    assert dec.profile(PROMPT, GREEDY, steps=2)["proposal"] == 0.0


def test_cpu_linears_are_packed_and_match_dense(backbone):
    assert isinstance(backbone.lm_head, PackedLinear)  # the fast backbone on a CPU packs its linears
    assert isinstance(backbone.model.layers[0].feed_forward.w13, PackedLinear)
    torch.manual_seed(0)
    for bias in (False, True):
        dense = torch.nn.Linear(64, 96, bias=bias)
        packed = pack_for_cpu(dense)
        assert isinstance(packed, PackedLinear) and packed.weight is dense.weight
        for shape in ((64,), (1, 64), (3, 64), (1, 5, 64)):
            x = torch.randn(shape)
            with torch.no_grad():
                torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
    assert pack_for_cpu(torch.nn.Linear(8, 8).to(torch.bfloat16)).__class__ is torch.nn.Linear  # fp32 only
