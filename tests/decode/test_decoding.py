"""Medusa greedy decoding reproduces vanilla greedy exactly; the statistics add up; bad inputs are refused."""

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode import proposal
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
from medusa_llama.decode.tree import BUILTIN_TREE_NAMES, builtin_tree
from medusa_llama.errors import MedusaError

GREEDY = GenerationConfig(max_new_tokens=48, stop_at_eos=False)


class OracleHeads(MedusaHeads):
    """Heads that know the vanilla continuation: the rank-0 path always holds the right tokens."""

    def __init__(self, backbone, prompt_len: int, answer: list[int], num_heads: int = 4):
        super().__init__(HeadsConfig(num_heads=num_heads, hidden_size=64, vocab_size=96, base_model="tiny"))
        self.backbone, self.prompt_len, self.answer = backbone, prompt_len, answer

    def propose(self, hidden, root, tree, embed, lm_head, draft=None, fused=False, out=None):
        at = int(self.backbone.cache_len) - self.prompt_len + 1  # index in `answer` of the root's successor
        tokens = torch.randint(0, 96, (tree.size,))
        tokens[0] = root
        for i, path in enumerate(tree.paths, start=1):
            tokens[i] = (tokens[i] + 1) % 96  # wrong by default ...
            if all(r == 0 for r in path) and at + len(path) - 1 < len(self.answer):
                tokens[i] = self.answer[at + len(path) - 1]  # ... right along the rank-0 chain
            elif tokens[i] == self.answer[min(at + len(path) - 1, len(self.answer) - 1)]:
                tokens[i] = (tokens[i] + 1) % 96
        return out.copy_(tokens)  # the decoder passes its tokens buffer


@pytest.fixture(scope="module", params=["fast", "hf"])
def backbone(request):
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, request.param)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 17, 30)]


@pytest.mark.parametrize("tree_name", BUILTIN_TREE_NAMES)
@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_random_heads_greedy_equals_vanilla(backbone, prompts, kind, tree_name):
    vanilla = VanillaDecoder(backbone)
    medusa = MedusaDecoder(backbone, random_heads(kind), builtin_tree(tree_name))
    for prompt in prompts:
        ref = vanilla.generate(prompt, GREEDY)
        out = medusa.generate(prompt, GREEDY)
        assert out.tokens == ref.tokens
        assert len(out.tokens) == GREEDY.max_new_tokens


def tied_llama(dtype: torch.dtype = torch.float32):
    """The tiny Llama with the LM head's rows 72..95 copies of rows 40..63: about a third of the argmaxes are ties (of
    column c in the second chunk of 32 and c + 32 in the last), which greedy decoding must break to the lower column
    as ``torch.argmax`` does; the last chunk's own columns 64..71 win at times too."""
    hf = tiny_llama().to(dtype)
    with torch.no_grad():
        hf.lm_head.weight[72:] = hf.lm_head.weight[40:64]
    return hf


TIE_PROMPTS = [list(range(3, 14)), [5, 90, 41, 7]]
"""Prompts whose ``tied_llama`` continuations pass through tied columns (40..63) and the last chunk's (64..71)."""


@pytest.fixture
def kernel_path(monkeypatch):
    """The fast backbone of ``tied_llama`` on its GPU path (Triton's interpreter on a CPU), its argmax over 3 chunks
    of 32 columns, and the greedy kernels' calls counted (so that a test knows the path ran)."""
    from test_prefix import kernel_device

    from medusa_llama.decode import kernels

    kernel_device()
    monkeypatch.setattr(kernels, "ARGMAX_CHUNK_MIN", 32)
    monkeypatch.setattr(kernels, "ARGMAX_CHUNK_MAX", 32)
    calls = {"greedy_token": 0, "greedy_accept": 0}

    def counted(name: str):
        kernel = getattr(kernels, name)

        def call(*args):
            calls[name] += 1
            return kernel(*args)

        return call

    for name in calls:
        monkeypatch.setattr(kernels, name, counted(name))
    bb = make_backbone(tied_llama(), FakeTokenizer(), "tiny", 256, "fast")
    bb.tree_kernel = bb.model.use_fused_kernels = True
    return bb, calls


@pytest.mark.parametrize("tree_name", [None, "root", "chain", "tree16"])
def test_greedy_kernel_path_equals_the_pytorch_path(one_thread, kernel_path, tree_name, monkeypatch):
    """Greedy decoding on the GPU path (the argmax's chunks, then ``greedy_token`` or ``greedy_accept``; the step's
    kernels, interpreted) = vanilla greedy decoding on the PyTorch path, token for token: ``VanillaDecoder`` (None), a
    root-only tree (vanilla decoding in ``MedusaDecoder``) and two trees whose oracle heads have the rank-0 chain
    right (steps that accept the whole depth, the other nodes rejected)."""
    monkeypatch.setattr(proposal, "propose", lambda heads, *args: heads.propose(*args))  # the oracle proposes
    bb, calls = kernel_path
    reference = make_backbone(tied_llama(), FakeTokenizer(), "tiny", 256, "fast")  # the PyTorch path
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    for prompt in TIE_PROMPTS:
        ref = VanillaDecoder(reference).generate(prompt, cfg).tokens
        if tree_name is None:
            dec = VanillaDecoder(bb)
        else:
            tree = [] if tree_name == "root" else builtin_tree(tree_name)
            dec = MedusaDecoder(bb, OracleHeads(bb, len(prompt), ref), tree)
        out = dec.generate(prompt, cfg)
        assert out.tokens == ref
        assert out.steps < len(ref) - 1 or tree_name in (None, "root")  # the trees' candidates were accepted
    assert calls["greedy_token" if tree_name in (None, "root") else "greedy_accept"] > 0


@pytest.mark.parametrize("kind", ["vanilla", "medusa"])
def test_greedy_kernels_on_bf16_logits_equal_the_fp32_path(one_thread, kernel_path, kind, monkeypatch):
    """The greedy kernels read bf16 logits uncast (``Backbone.logits(..., float32=False)``) and choose as the fp32
    path's ``torch.argmax`` does, ties included: one bf16 backbone on the PyTorch path, the kernels switched on
    for the greedy rule alone (``decoder.kernel``; the heads propose by their PyTorch path in both), so that the
    tokens and the steps' accepted lengths must be the same."""
    _, calls = kernel_path
    pytorch_propose = proposal.propose
    monkeypatch.setattr(proposal, "propose", lambda *args: pytorch_propose(*args[:7], False, *args[8:]))
    bb = make_backbone(tied_llama(torch.bfloat16), FakeTokenizer(), "tiny", 256, "fast")
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False)

    def run(prompt, kernel: bool):
        if kind == "vanilla":
            dec = VanillaDecoder(bb)
        else:
            dec = MedusaDecoder(bb, random_heads("medusa", std=0.05), builtin_tree("tree16"))
        dec.kernel = kernel
        out = dec.generate(prompt, cfg)
        return out.tokens, out.accepted_per_depth

    for prompt in TIE_PROMPTS:
        assert run(prompt, True) == run(prompt, False)
    assert calls["greedy_token" if kind == "vanilla" else "greedy_accept"] > 0


def test_vanilla_equals_hf_generate(backbone, prompts):
    for prompt in prompts:
        ref = backbone.hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
        out = VanillaDecoder(backbone).generate(prompt, GenerationConfig(max_new_tokens=20, stop_at_eos=False))
        assert out.tokens == ref[0, len(prompt) :].tolist()


@pytest.mark.parametrize("tree_name", BUILTIN_TREE_NAMES)
def test_oracle_heads_accept_the_whole_depth(backbone, prompts, tree_name, monkeypatch):
    monkeypatch.setattr(proposal, "propose", lambda heads, *args: heads.propose(*args))  # the oracle proposes
    prompt = prompts[1]
    ref = VanillaDecoder(backbone).generate(prompt, GREEDY)
    tree = builtin_tree(tree_name)
    depth = max(len(p) for p in tree)
    out = MedusaDecoder(backbone, OracleHeads(backbone, len(prompt), ref.tokens), tree).generate(prompt, GREEDY)
    assert out.tokens == ref.tokens
    full_steps = (len(ref.tokens) - 1) // (depth + 1)
    assert out.steps == -(-(len(ref.tokens) - 1) // (depth + 1))  # every step but the last accepts depth + 1
    assert out.accepted_per_depth[depth - 1] >= full_steps
    assert out.mean_accepted == pytest.approx((len(out.tokens) - 1) / out.steps)


def test_statistics_add_up(backbone, prompts):
    out = MedusaDecoder(backbone, random_heads("medusa", std=0.05), builtin_tree("tree64")).generate(prompts[0], GREEDY)
    accepted = sum(out.accepted_per_depth)  # candidate tokens accepted over all steps
    assert len(out.tokens) == 1 + out.steps + accepted  # first token + one bonus per step + accepted candidates
    assert len(out.token_times) == len(out.tokens)
    assert out.token_times == sorted(out.token_times)
    assert all(a >= b for a, b in zip(out.accepted_per_depth, out.accepted_per_depth[1:], strict=False))


def test_stops_at_eos():
    hf = tiny_llama()
    prompt = [1, 2, 3, 4]
    free = VanillaDecoder(make_backbone(hf, FakeTokenizer(), "tiny", 256)).generate(prompt, GREEDY).tokens
    tok = FakeTokenizer()
    tok.eos_token_id = free[5]
    bb = make_backbone(hf, tok, "tiny", 256)
    cfg = GenerationConfig(max_new_tokens=48)
    van = VanillaDecoder(bb).generate(prompt, cfg).tokens
    med = MedusaDecoder(bb, random_heads(), builtin_tree("tree64")).generate(prompt, cfg).tokens
    assert van == med == free[: free.index(free[5]) + 1]


def test_bad_inputs_are_refused(backbone):
    with pytest.raises(MedusaError, match="exceeds the context"):
        VanillaDecoder(backbone).generate(list(range(90)) * 3, GenerationConfig(max_new_tokens=10))
    with pytest.raises(MedusaError, match="empty"):
        VanillaDecoder(backbone).generate([], GREEDY)
    with pytest.raises(ValueError, match="3 deep but there are only 2 heads"):
        MedusaDecoder(backbone, random_heads(num_heads=2), builtin_tree("tree64"))
    wrong = MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=96))
    with pytest.raises(MedusaError, match="hidden size"):
        MedusaDecoder(backbone, wrong, builtin_tree("chain"))
    with pytest.raises(ValueError, match="--temperature"):
        GenerationConfig(acceptance="typical").acceptance_config()
    with pytest.raises(ValueError, match="--acceptance"):
        GenerationConfig(acceptance="nope", temperature=1.0).acceptance_config()


def test_medusa_sampling_matches_the_backbone_distribution():
    """Lossless sampling end to end: the 2nd and 3rd tokens follow the backbone's exact marginals."""
    hf = tiny_llama(seed=5, vocab_size=8)
    bb = make_backbone(hf, FakeTokenizer(), "tiny", 64)
    torch.manual_seed(0)
    heads = MedusaHeads(HeadsConfig(num_heads=2, hidden_size=64, vocab_size=8, base_model="tiny"))
    dec = MedusaDecoder(bb, heads, [[0], [1], [0, 0], [1, 0], [0, 1]])
    prompt = [1, 2, 3]
    cfg = GenerationConfig(max_new_tokens=3, temperature=1.0, stop_at_eos=False)
    runs = 1500
    counts = torch.zeros(2, 8)
    for i in range(runs):
        toks = dec.generate(prompt, GenerationConfig(**{**cfg.__dict__, "seed": i})).tokens
        counts[0, toks[1]] += 1
        counts[1, toks[2]] += 1
    with torch.no_grad():  # exact marginals of tokens 2 and 3 by enumeration
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)
        seqs = torch.tensor([[*prompt, a, b] for a in range(8) for b in range(8)])
        logits = hf(seqs).logits
        p2 = torch.softmax(logits[:, -2], -1)[::8]  # (8, 8): p(x2 | x1)
        p3 = torch.softmax(logits[:, -1], -1).view(8, 8, 8)  # p(x3 | x1, x2)
    m2 = p1 @ p2
    m3 = torch.einsum("a,ab,abc->c", p1, p2, p3)
    for emp, exact in ((counts[0] / runs, m2), (counts[1] / runs, m3)):
        se = (exact * (1 - exact) / runs).sqrt()
        assert ((emp - exact).abs() <= 5 * se + 2e-3).all(), (emp, exact)
