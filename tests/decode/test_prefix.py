"""Prefix attention (Hydra++): a fresh layer is the identity; the cached decoding form equals the training form;
decoding with prefix heads stays lossless and keeps the layer's cache in step with the backbone's; files round-trip;
the export formats refuse it."""

import json

import pytest
import torch
from conftest import FakeTokenizer, random_heads, tiny_llama

from medusa_llama.decode import prefix, proposal
from medusa_llama.decode.backbone import FastBackbone, make_backbone
from medusa_llama.decode.decoder import PHASES, GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.dynamic_tree import DynamicTree
from medusa_llama.decode.formats import EXPORT_FORMATS
from medusa_llama.decode.heads import CONFIG_NAME, HeadsConfig, MedusaHeads
from medusa_llama.decode.heads_io import export_heads
from medusa_llama.decode.prefix import BatchedPrefixCache, PrefixCache
from medusa_llama.decode.tree import builtin_tree
from medusa_llama.errors import MedusaError

PREFIX = dict(prefix_attention=True, prefix_num_heads=4)
TOKEN = dict(prefix_attention=True, prefix_num_heads=4, prefix_token_input=True)  # the EAGLE-style token input
GREEDY = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
TREES = {"tree64": lambda: builtin_tree("tree64"), "dynamic16": lambda: DynamicTree(16, 4, 4)}


def prefix_heads(kind: str = "sequential", std: float = 0.3, seed: int = 0, prefix_token_input=False) -> MedusaHeads:
    return random_heads(kind, seed=seed, std=std, prefix_token_input=prefix_token_input, **PREFIX)


@pytest.fixture(scope="module", params=["fast", "hf"])
def backbone(request):
    return make_backbone(tiny_llama(), FakeTokenizer(), "tiny", 256, request.param)


@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_fresh_prefix_layer_is_the_identity(kind):
    heads = MedusaHeads(HeadsConfig(hidden_size=64, vocab_size=96, kind=kind, **PREFIX))
    x = torch.randn(2, 9, 64)
    assert torch.equal(heads.head_inputs(x), x)
    cache = PrefixCache(heads.prefix, 32, torch.device("cpu"), torch.float32)
    assert torch.equal(cache.extend(x[0]), x[0])


@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_fresh_token_input_is_the_identity(kind):
    """A fresh token projection adds zero: the same outputs as the layer without the option, in both forms."""
    plain = random_heads(kind, **PREFIX)
    heads = MedusaHeads(HeadsConfig(**{**vars(plain.config), "prefix_token_input": True}))
    missing, unexpected = heads.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["prefix.token.weight"] and not unexpected and not heads.prefix.token.weight.any()
    x, e = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    with torch.no_grad():
        assert torch.equal(heads.head_inputs(x, e), plain.head_inputs(x))
    cache = PrefixCache(heads.prefix, 32, torch.device("cpu"), torch.float32)
    assert torch.equal(
        cache.extend(x[0], next_emb=e[0]), PrefixCache(plain.prefix, 32, cache.k.device, x.dtype).extend(x[0])
    )
    with pytest.raises(ValueError, match="next_emb"):
        cache.extend(x[0])


@pytest.mark.parametrize("token_input", [False, True])
def test_extend_in_pieces_equals_the_training_form(token_input):
    layer = prefix_heads(prefix_token_input=token_input).prefix
    x, e = torch.randn(1, 20, 64), torch.randn(1, 20, 64)  # e: the next tokens' embeddings (read with the option)
    with torch.no_grad():
        full = layer(x, e)[0]  # (20, D)
        assert token_input == (not torch.allclose(full, layer(x, torch.zeros_like(e))[0]))  # it reads them
    cache = PrefixCache(layer, 64, torch.device("cpu"), torch.float32)
    out, at = [], 0
    for n, count in ((5, 5), (4, 1), (4, 3), (1, 1), (6, 4), (7, 6)):  # chunks of n rows, the first `count` real
        rows = torch.cat([x[0, at : at + count], torch.randn(n - count, 64)])  # padding rows after the real ones
        next_emb = torch.cat([e[0, at : at + count], torch.randn(n - count, 64)])
        out.append(cache.extend(rows, torch.tensor(count), next_emb)[:count])
        at += count
    assert at == 20 and int(cache.length) == 20
    torch.testing.assert_close(torch.cat(out), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("token_input", [False, True])
@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("kind", ["medusa", "sequential"])
def test_prefix_heads_greedy_equals_vanilla(backbone, kind, tree, token_input):
    g = torch.Generator().manual_seed(3)
    medusa = MedusaDecoder(backbone, prefix_heads(kind, prefix_token_input=token_input), TREES[tree]())
    for n in (5, 23):
        prompt = torch.randint(0, 96, (n,), generator=g).tolist()
        assert medusa.generate(prompt, GREEDY).tokens == VanillaDecoder(backbone).generate(prompt, GREEDY).tokens


def expected_head_input(backbone, heads, prompt, continuation):
    """The training form's heads input at the last committed token: the prefix layer over h_0 .. h_{L-1}, its token
    input (if any) reading x_1 .. x_L, each committed token's successor (x_L: the root, emitted but not committed)."""
    committed, ids = int(backbone.cache_len), prompt + continuation
    seq = torch.tensor([ids[:committed]])  # (1, L): the tokens in the backbone's cache
    with torch.no_grad():
        hidden = backbone.hf_model.model(input_ids=seq).last_hidden_state  # (1, L, D)
        next_emb = backbone.hf_model.get_input_embeddings()(torch.tensor([ids[1 : committed + 1]]))  # (1, L, D)
        return heads.head_inputs(hidden, next_emb)[0, -1]


class OracleChain(MedusaHeads):
    """Prefix heads whose rank-0 chain always holds the vanilla continuation: every step accepts the whole depth."""

    def __init__(self, backbone, prompt_len: int, answer: list[int], token_input: bool = False):
        heads = prefix_heads(prefix_token_input=token_input)
        super().__init__(heads.config)
        self.load_state_dict(heads.state_dict())
        self.backbone, self.prompt_len, self.answer = backbone, prompt_len, answer

    def propose(self, hidden, root, tree, embed, lm_head, draft=None, fused=False, out=None):
        at = int(self.backbone.cache_len) - self.prompt_len + 1  # index in `answer` of the root's successor
        tokens = torch.zeros(tree.size, dtype=torch.long)
        tokens[0] = root
        for i, path in enumerate(tree.paths, start=1):
            right = all(r == 0 for r in path) and at + len(path) - 1 < len(self.answer)
            tokens[i] = self.answer[at + len(path) - 1] if right else 95
        return out.copy_(tokens)  # the decoder passes its tokens buffer


@pytest.mark.parametrize("token_input", [False, True])
@pytest.mark.parametrize("tree", TREES)
def test_decoder_heads_input_equals_the_training_form(backbone, tree, token_input):
    """The cache bookkeeping, pinned directly: a wrong row (or a wrong next token for the token input) would only
    lower acceptance, never break losslessness."""
    prompt = list(range(3, 14))
    ref = VanillaDecoder(backbone).generate(prompt, GenerationConfig(max_new_tokens=60, stop_at_eos=False)).tokens
    heads = prefix_heads(std=0.05, prefix_token_input=token_input)
    dec = MedusaDecoder(backbone, heads, TREES[tree]())
    out = dec.generate(prompt, GenerationConfig(max_new_tokens=30, stop_at_eos=False))
    assert out.steps > 3 and int(dec.prefix_cache.length) == int(backbone.cache_len)
    torch.testing.assert_close(dec.hidden, expected_head_input(backbone, dec.heads, prompt, ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("token_input", [False, True])
def test_heads_input_after_fully_accepted_steps(backbone, monkeypatch, token_input):
    monkeypatch.setattr(proposal, "propose", lambda heads, *args: heads.propose(*args))  # the oracle proposes
    prompt = list(range(3, 14))
    ref = VanillaDecoder(backbone).generate(prompt, GenerationConfig(max_new_tokens=60, stop_at_eos=False)).tokens
    dec = MedusaDecoder(backbone, OracleChain(backbone, len(prompt), ref, token_input), builtin_tree("tree64"))
    out = dec.generate(prompt, GenerationConfig(max_new_tokens=25, stop_at_eos=False))
    assert out.tokens == ref[:25] and out.accepted_per_depth[2] == out.steps  # every step accepted 3 candidates
    torch.testing.assert_close(dec.hidden, expected_head_input(backbone, dec.heads, prompt, ref), rtol=1e-4, atol=1e-4)


def test_root_only_tree_keeps_no_prefix_cache(backbone):
    dec = MedusaDecoder(backbone, prefix_heads(), [])
    assert dec.prefix_cache is None
    assert dec.generate([1, 2, 3], GREEDY).tokens == VanillaDecoder(backbone).generate([1, 2, 3], GREEDY).tokens


def test_profile_reports_the_prefix_in_the_proposal_phase(backbone):
    ms = MedusaDecoder(backbone, prefix_heads(), builtin_tree("tree16")).profile([1, 2, 3, 4], GREEDY, steps=3)
    assert set(ms) == {*PHASES, "total"} and ms["proposal"] > 0


@pytest.mark.parametrize("token_input", [False, True])
def test_save_load_round_trip_gives_the_same_proposals(tmp_path, backbone, token_input):
    heads = prefix_heads(prefix_token_input=token_input)
    heads.save(tmp_path / "h")
    saved = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    assert saved["prefix_attention"] is True and saved["prefix_token_input"] is token_input
    loaded = MedusaHeads.load(tmp_path / "h")
    assert loaded.config == heads.config and loaded.state_dict().keys() == heads.state_dict().keys()
    assert any(k.startswith("prefix.") for k in loaded.state_dict())
    assert ("prefix.token.weight" in loaded.state_dict()) is token_input
    if token_input:
        assert torch.equal(loaded.prefix.token.weight, heads.prefix.token.weight)
    a = MedusaDecoder(backbone, heads, builtin_tree("tree64"))
    b = MedusaDecoder(backbone, loaded, builtin_tree("tree64"))
    for dec in (a, b):
        dec.generate(list(range(10)), GenerationConfig(max_new_tokens=12, stop_at_eos=False))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.hidden, b.hidden)


def test_old_config_without_the_key_loads_without_prefix(tmp_path):
    heads = random_heads()
    heads.save(tmp_path / "h")
    raw = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    old = {k: v for k, v in raw.items() if not k.startswith("prefix") and k != "rope_theta"}
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps(old))
    loaded = MedusaHeads.load(tmp_path / "h")
    assert loaded.config.prefix_attention is False and loaded.prefix is None


def test_prefix_config_without_the_token_input_key_loads_without_it(tmp_path):
    heads = prefix_heads()
    heads.save(tmp_path / "h")
    raw = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    del raw["prefix_token_input"]  # as heads written before the option
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps(raw))
    loaded = MedusaHeads.load(tmp_path / "h")
    assert loaded.config.prefix_attention and not loaded.config.prefix_token_input and loaded.prefix.token is None


def test_token_input_needs_prefix_attention():
    with pytest.raises(ValueError, match="needs --prefix-attention"):
        HeadsConfig(hidden_size=64, vocab_size=96, prefix_token_input=True)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("cfg, message", [(PREFIX, "prefix attention"), (TOKEN, "prefix token input")])
def test_export_refuses_prefix_heads(tmp_path, fmt, cfg, message):
    heads = random_heads("medusa", lm_head="own", **cfg)
    with pytest.raises(MedusaError, match=f"{message} .*cannot be exported") as info:
        export_heads(heads, tmp_path / "out", fmt)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def kernel_device() -> str:
    """The device the Triton kernels run on: the GPU, else the CPU through Triton's interpreter (skips the test if
    Triton is missing, or was imported before conftest set TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from medusa_llama.decode import attention

    if torch.cuda.is_available():
        return "cuda"
    if type(attention._split_kernel).__name__ != "InterpretedFunction":
        pytest.skip("Triton was imported before conftest set TRITON_INTERPRET=1")
    return "cpu"


def test_extend_by_the_triton_kernel_equals_sdpa():
    """Decode-step extends attend by the split-K kernel on a GPU (interpreted here): same outputs as SDPA."""
    dev = kernel_device()
    layer = prefix_heads().prefix.to(dev)
    x = torch.randn(30, 64, device=dev)
    caches = [PrefixCache(layer, 64, torch.device(dev), torch.float32, kernel=k) for k in (False, True)]
    outs = []
    for cache in caches:
        cache.extend(x[:11])  # a prefill (SDPA in both)
        rows = [
            cache.extend(x[at : at + 5], torch.tensor(count, device=dev))[:count]
            for at, count in ((11, 3), (14, 5), (19, 1))
        ]
        outs.append(torch.cat(rows))
        assert int(cache.length) == 20
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("token_input", [False, True])
@pytest.mark.parametrize("kernel", [False, True])
def test_batched_cache_rows_equal_single_caches(kernel, token_input):
    """One row per sequence, each at its own length; a count of 0 keeps a row in place (an inactive batch row)."""
    dev = kernel_device() if kernel else "cuda" if torch.cuda.is_available() else "cpu"
    layer = prefix_heads(prefix_token_input=token_input).prefix.to(dev)
    g = torch.Generator().manual_seed(0)
    x, e = (torch.randn(3, 40, 64, generator=g).to(dev) for _ in range(2))  # e: the next tokens' embeddings
    batched = BatchedPrefixCache(layer, 3, 64, torch.device(dev), torch.float32, kernel=kernel)
    singles = [PrefixCache(layer, 64, torch.device(dev), torch.float32) for _ in range(3)]  # SDPA
    at = [11, 4, 20]
    for b, n in enumerate(at):
        ref = singles[b].extend(x[b, :n], next_emb=e[b, :n])
        torch.testing.assert_close(batched.prefill(b, x[b, :n], e[b, :n]), ref, rtol=1e-5, atol=1e-5)
    for counts in ([3, 5, 0], [1, 0, 4], [5, 2, 5]):
        rows = torch.stack([x[b, n : n + 5] for b, n in enumerate(at)])  # (3, 5, D): the first counts[b] real
        next_emb = torch.stack([e[b, n : n + 5] for b, n in enumerate(at)])
        out = batched.extend(rows, torch.tensor(counts, device=dev), next_emb)
        for b, count in enumerate(counts):
            ref = singles[b].extend(rows[b], count, next_emb[b])
            torch.testing.assert_close(out[b, :count], ref[:count], rtol=1e-4, atol=1e-4)
            at[b] += count
        assert batched.lengths.tolist() == at == [int(s.length) for s in singles]


@pytest.mark.parametrize("tree", TREES)
def test_token_input_padded_prefill_equals_the_plain_one(backbone, tree):
    """The CUDA-graph prefill's padded form (the length on the device: the root's slot is scattered) starts the first
    step from the same heads input and proposal, and decodes the same tokens."""
    if not isinstance(backbone, FastBackbone):
        pytest.skip("the padded prefill is the fast backbone's")
    prompt, one = list(range(3, 24)), GenerationConfig(max_new_tokens=1, stop_at_eos=False)
    decs = [MedusaDecoder(backbone, prefix_heads(prefix_token_input=True), TREES[tree]()) for _ in range(2)]
    decs[1].padded_prefill = True
    for dec in decs:
        dec.generate(prompt, one)
    assert int(decs[1].prefix_cache.length) == len(prompt) and torch.equal(decs[0].tokens, decs[1].tokens)
    torch.testing.assert_close(decs[1].hidden, decs[0].hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        decs[1].hidden, expected_head_input(backbone, decs[1].heads, prompt, [int(decs[1].root)])
    )
    assert decs[1].generate(prompt, GREEDY).tokens == decs[0].generate(prompt, GREEDY).tokens


LOW = torch.bfloat16 if torch.cuda.is_available() else torch.float16
"""The low-precision dtype of the fused-kernel tests: bf16 as decoding runs, but fp16 in Triton's interpreter, which
mishandles bf16 (its attention kernel returns garbage there, fused layer or not), as ``test_attention.py`` does."""


@pytest.mark.parametrize("gemms", [False, True], ids=["kernels", "gemms"])
@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("token_input", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_extend_equals_the_unfused_one(batch, token_input, dtype, gemms, monkeypatch):
    """Decode-step extends by the fused Triton kernels (RMSNorm, one q/k/v GEMM, rotary + cache write, add + RMSNorm,
    one gate/up GEMM, SwiGLU; with ``FUSED_GEMMS`` the GEMMs carrying them, ``small_linear.py``) against the PyTorch
    ops, both attending by the split-K kernel: the same outputs and K/V cache contents over several uneven extends,
    rows at their own lengths (batch 3; a count of 0 holds a row)."""
    monkeypatch.setattr(prefix, "FUSED_GEMMS", gemms)
    dev = kernel_device()
    layer = prefix_heads(prefix_token_input=token_input).prefix.to(device=dev, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x, e = (torch.randn(batch, 40, 64, generator=g).to(device=dev, dtype=dtype) for _ in range(2))
    caches = [BatchedPrefixCache(layer, batch, 48, torch.device(dev), dtype, kernel=True, fused=f) for f in (0, 1)]
    assert [c.fused for c in caches] == [False, True]

    def close(out: torch.Tensor, ref: torch.Tensor) -> None:
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        else:  # bf16 / fp16: the rotary embedding rounds once in the kernel, three times in PyTorch; the GEMMs differ
            err = float((out.double() - ref.double()).norm() / ref.double().norm())
            assert err < (5e-3 if dtype == torch.float16 else 2e-2), f"relative error {err:.1e}"

    for cache in caches:  # the prefill: PyTorch ops in both
        for row in range(batch):
            cache.prefill(row, x[row, : 7 + row], e[row, : 7 + row])
    counts = [[3, 0, 5][:batch], [1, 2, 0][:batch], [6, 6, 1][:batch], [2, 1, 4][:batch]]
    for n, count in zip((4, 3, 6, 5), counts, strict=True):  # uneven extends, padding rows past each count
        at = caches[0].lengths.tolist()
        rows = torch.stack([x[b, a : a + n] for b, a in enumerate(at)])  # (batch, n, D)
        next_emb = torch.stack([e[b, a : a + n] for b, a in enumerate(at)])
        count = torch.tensor(count, device=dev)
        ref, out = (cache.extend(rows, count, next_emb) for cache in caches)
        close(out, ref)
        assert torch.equal(caches[1].lengths, caches[0].lengths)
    close(caches[1].k, caches[0].k)
    close(caches[1].v, caches[0].v)
    assert caches[0].k[:, int(caches[0].lengths.max()) + 5 :].abs().sum() == 0  # nothing past the last extend


@pytest.mark.parametrize("gemms", [False, True], ids=["kernels", "gemms"])
@pytest.mark.parametrize("token_input", [False, True])
def test_prefix_heads_on_the_kernel_path_greedy_equals_vanilla(one_thread, token_input, gemms, monkeypatch):
    """The whole decoder on the kernel path (the GPU default; interpreted here): backbone and prefix layer by the
    Triton kernels, the layer's decode-step extends fused (``FUSED_EXTEND``, its GEMMs with their prologues and
    epilogues or not: ``FUSED_GEMMS``). Greedy equals vanilla, and the heads' input after the steps equals the
    training form (the tokens alone could not see a wrong layer: verification is exact)."""
    monkeypatch.setattr(prefix, "FUSED_EXTEND", True)
    monkeypatch.setattr(prefix, "FUSED_GEMMS", gemms)
    dev = kernel_device()
    bb = make_backbone(tiny_llama().to(dev), FakeTokenizer(), "tiny", 64, "fast")
    prompt, cfg = list(range(3, 14)), GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    # vanilla on the PyTorch path (equal to the kernel path in fp32: test_attention.py), quicker in the interpreter
    ref = VanillaDecoder(bb).generate(prompt, GenerationConfig(max_new_tokens=30, stop_at_eos=False)).tokens
    bb.tree_kernel = bb.model.use_fused_kernels = True
    dec = MedusaDecoder(bb, prefix_heads(std=0.05, prefix_token_input=token_input), builtin_tree("tree16"))
    assert dec.prefix_cache.kernel and dec.prefix_cache.fused and dec._path_inputs  # extend_path
    out = dec.generate(prompt, cfg)
    assert out.tokens == ref[:6] and out.steps >= 3 and int(dec.prefix_cache.length) == int(bb.cache_len)
    assert dec._state_row  # the step's proposal reads the prefix layer's row n in place
    torch.testing.assert_close(dec.heads_input(), expected_head_input(bb, dec.heads, prompt, ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads_kind", ["random", "oracle"])
@pytest.mark.parametrize("token_input", [False, True])
def test_fused_accept_decodes_as_the_separate_launches(one_thread, token_input, heads_kind, monkeypatch):
    """The kernel path's step with ``acceptance.FUSED_ACCEPT`` (the acceptance, the backbone's K/V move and the
    prefix layer's inputs in one launch, ``kernels.accept_move``) and without (their own launches): both decode as
    vanilla greedy (fp32), with the same accepted lengths, caches (lengths and committed K/V, the backbone's and the
    prefix layer's) and heads' input. Random heads accept little (steps of n = 0 among them), the oracle the whole
    depth of every step (the longest path)."""
    from medusa_llama.decode import acceptance, kernels

    monkeypatch.setattr(prefix, "FUSED_EXTEND", True)
    if heads_kind == "oracle":
        monkeypatch.setattr(proposal, "propose", lambda heads, *args, **row: heads.propose(*args))
    dev = kernel_device()
    bb = make_backbone(tiny_llama().to(dev), FakeTokenizer(), "tiny", 64, "fast")
    prompt, count = list(range(3, 14)), 6 if heads_kind == "random" else 17
    ref = VanillaDecoder(bb).generate(prompt, GenerationConfig(max_new_tokens=40, stop_at_eos=False)).tokens
    bb.tree_kernel = bb.model.use_fused_kernels = True
    calls, fused_call = [], kernels.accept_move
    monkeypatch.setattr(kernels, "accept_move", lambda *args: calls.append(1) or fused_call(*args))
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(acceptance, "FUSED_ACCEPT", fused)
        calls.clear()
        if heads_kind == "oracle":
            heads = OracleChain(bb, len(prompt), ref, token_input)
        else:
            heads = prefix_heads(std=0.05, prefix_token_input=token_input)
        dec = MedusaDecoder(bb, heads, builtin_tree("tree16"))
        out = dec.generate(prompt, GenerationConfig(max_new_tokens=count, stop_at_eos=False))
        assert out.tokens == ref[:count] and len(calls) == (out.steps if fused else 0)
        n, pc = int(bb.cache_len), dec.prefix_cache
        assert int(pc.length) == n
        state = [bb.model.k_cache[:, :, :n], bb.model.v_cache[:, :, :n], pc.k[:, :n], pc.v[:, :n], dec.heads_input()]
        runs.append((out.accepted_per_depth, [x.clone() for x in state]))
    (depths, state), (ref_depths, ref_state) = runs
    assert depths == ref_depths
    if heads_kind == "random":
        assert depths[0] < out.steps  # steps of n = 0
    else:
        assert depths[-1] == out.steps  # every step accepted its whole depth
    for a, b in zip(state, ref_state, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gemms", [False, True], ids=["kernels", "gemms"])
@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("token_input", [False, True])
def test_extend_path_equals_the_gathered_extend(token_input, dtype, gemms, monkeypatch):
    """``PrefixCache.extend_path`` (the step's gathers, slots, rotary tables and length advance in one kernel,
    ``kernels.path_inputs``) equals ``extend(hidden[path], n + 1, table[emitted])`` on the fused path, either form of
    its GEMMs (``FUSED_GEMMS``): the same outputs, K/V cache contents and lengths over several steps (paths with
    repeated padding nodes, n from 0 up)."""
    monkeypatch.setattr(prefix, "FUSED_GEMMS", gemms)
    dev = kernel_device()
    layer = prefix_heads(prefix_token_input=token_input).prefix.to(device=dev, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    table = torch.randn(50, 64, generator=g).to(device=dev, dtype=dtype)
    caches = [PrefixCache(layer, 48, torch.device(dev), dtype, kernel=True, fused=True) for _ in range(2)]
    start = torch.randn(2, 9, 64, generator=g).to(device=dev, dtype=dtype)
    for cache in caches:  # a prefill
        cache.extend(start[0], None, start[1])
    for n, path in ((2, [0, 3, 5, 5, 5]), (0, [0, 0, 0, 0, 0]), (4, [0, 1, 4, 6, 7]), (1, [0, 2, 2, 2, 2])):
        hidden = torch.randn(8, 64, generator=g).to(device=dev, dtype=dtype)  # the verify forward's states
        path = torch.tensor(path, device=dev)
        emitted = torch.randint(0, 50, (5,), generator=g).to(dev)
        out = torch.tensor([n], device=dev)
        ref = caches[0].extend(hidden[path], out[0] + 1, table[emitted] if token_input else None)
        got = caches[1].extend_path(hidden, path, out, emitted, table)
        assert torch.equal(got[: n + 1], ref[: n + 1]), n
        assert torch.equal(caches[1].lengths, caches[0].lengths)
    assert int(caches[1].length) == 9 + 2 + 0 + 4 + 1 + 4
    for a, b in ((caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
        assert torch.equal(a[:, :22], b[:, :22])
