"""The prefix layer's "few rows" GEMM kernels (``small_linear.py``) equal the PyTorch ops they replace (on a CPU
through Triton's interpreter): RMSNorm + q/k/v GEMM + rotary + K/V cache write, RMSNorm + gate/up GEMM + SwiGLU; and
the fused extend with them (``prefix.FUSED_GEMMS``) equals the one without, in fewer launches. ``test_prefix.py``
runs its fused-extend and decoder tests both ways too."""

import pytest
import torch
from test_prefix import kernel_device, prefix_heads

from medusa_llama.decode import prefix, small_linear
from medusa_llama.decode.op_count import OpCounter
from medusa_llama.decode.prefix import PrefixCache, PrefixLayer

SHAPES = [(64, 2), (64, 4), (128, 2), (128, 4), (80, 2)]
"""(D, heads): head dims 32, 16 (each half padded to 16 columns), 64, 32, and 40 (K = 80: a partial K tile)."""
TILES = {
    "default": {},
    "small": dict(QKV_BLOCK_N=16, GATE_UP_BLOCK_N=16, BLOCK_M_MAX=16, BLOCK_K=32),  # several programs per head / rows
}


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: to a few ulps (the GEMMs sum in another order). bf16: to a few of its ulps of the largest value: Triton's
    interpreter rounds fp32 to bf16 toward zero (a GPU and PyTorch to nearest), at each of the kernel's roundings."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))


def random_layer(d: int, heads: int, inter: int, dtype: torch.dtype, seed: int) -> PrefixLayer:
    """A prefix layer with every weight random (RMSNorm weights near one), on the kernels' device."""
    g = torch.Generator().manual_seed(seed)
    layer = PrefixLayer(d, heads, inter, 10000.0)
    for name, p in layer.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.data = 1 + 0.2 * noise if name.endswith("norm.weight") else noise * p.shape[-1] ** -0.5
    return layer.to(kernel_device(), dtype)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("d,heads", SHAPES)
def test_rms_qkv_rope_equals_the_torch_ops(d, heads, rows, dtype, tiles, monkeypatch):
    """``rms_qkv_rope`` = ``attn_norm``, the q/k/v projections and ``q cos + rotate_half(q) sin`` (``project``):
    the rotated q returned, k and v written at their slots of a two-sequence cache (flat slots across both), every
    other slot untouched."""
    for name, value in TILES[tiles].items():
        monkeypatch.setattr(small_linear, name, value)
    layer = random_layer(d, heads, 2 * d, dtype, seed=rows + d)
    dev, hd = layer.attn_norm.weight.device, layer.head_dim
    g = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, d, generator=g)).to(dev, dtype)
    cos, sin = layer.rope(torch.randint(0, 500, (rows,), generator=g).to(dev), dtype)  # (rows, 1, hd)
    k_cache, v_cache = (torch.randn(2, 24, heads, hd, generator=g).to(dev, dtype) for _ in range(2))
    before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(48, generator=g)[:rows].to(dev)  # slot s: sequence s // 24, position s % 24
    wqkv = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    norm = layer.attn_norm
    with torch.no_grad():
        q, k, v = layer.project(norm(x), cos, sin)  # (rows, nh, hd)
        got = small_linear.rms_qkv_rope(x, norm.weight, norm.eps, wqkv, cos, sin, slots, k_cache, v_cache)
    close(got, q)
    for cache, old, new in ((k_cache, before[0], k), (v_cache, before[1], v)):
        flat, old = cache.view(-1, heads, hd), old.view(-1, heads, hd)
        close(flat[slots], new)
        kept = torch.ones(48, dtype=torch.bool, device=dev)
        kept[slots] = False
        assert torch.equal(flat[kept], old[kept])


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("d,inter", [(64, 128), (128, 256), (80, 40)])
def test_rms_gate_up_silu_equals_the_torch_ops(d, inter, rows, dtype, tiles, monkeypatch):
    """``rms_gate_up_silu`` = ``mlp_norm``, then ``silu(gate_proj(h)) * up_proj(h)`` (``finish``'s MLP input);
    SwiGLU widths of 2 D and one of 40 (a partial column tile)."""
    for name, value in TILES[tiles].items():
        monkeypatch.setattr(small_linear, name, value)
    layer = random_layer(d, 2, inter, dtype, seed=rows + inter)
    g = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, d, generator=g)).to(layer.mlp_norm.weight.device, dtype)
    w13 = torch.cat([layer.gate_proj.weight, layer.up_proj.weight])
    with torch.no_grad():
        h = layer.mlp_norm(x)
        ref = torch.nn.functional.silu(layer.gate_proj(h)) * layer.up_proj(h)
        got = small_linear.rms_gate_up_silu(x, layer.mlp_norm.weight, layer.mlp_norm.eps, w13)
    close(got, ref)


@pytest.mark.parametrize("token_input", [False, True])
def test_fused_gemms_extend_equals_the_kernels_one(token_input, monkeypatch):
    """One extend of 5 rows (3 kept) after a prefill, ``FUSED_GEMMS`` on and off, fp32: the same outputs, caches and
    lengths; the caller's rows untouched (without the token input the layer's input is ``hidden`` itself, which the
    o_proj addmm must not add into)."""
    dev = kernel_device()
    layer = prefix_heads(prefix_token_input=token_input).prefix.to(dev)
    g = torch.Generator().manual_seed(3)
    x, e = (torch.randn(15, 64, generator=g).to(dev) for _ in range(2))
    caches, outs = [PrefixCache(layer, 32, torch.device(dev), torch.float32, kernel=True) for _ in range(2)], []
    for cache, gemms in zip(caches, (False, True), strict=True):
        monkeypatch.setattr(prefix, "FUSED_GEMMS", gemms)
        cache.extend(x[:10], None, e[:10])  # the prefill (PyTorch ops)
        rows = x[10:].clone()
        outs.append(cache.extend(rows, torch.tensor(3, device=dev), e[10:]))
        assert torch.equal(rows, x[10:])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert int(caches[0].length) == int(caches[1].length) == 13
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-5, atol=1e-5)


def test_fused_gemms_extend_launches_fewer_kernels(monkeypatch):
    """A decode step's extend (``_extend_fused`` on a scratch buffer, the token input) dispatches 6 ops with
    ``FUSED_GEMMS`` (7 launches: attention is two), 4 fewer than without: the token, o_proj and down addmms in place,
    the two fused GEMMs, attention."""
    dev = kernel_device()
    layer = prefix_heads(prefix_token_input=True).prefix.to(dev)
    cache = PrefixCache(layer, 32, torch.device(dev), torch.float32, kernel=True)
    cache.extend(torch.randn(10, 64, device=dev), None, torch.randn(10, 64, device=dev))
    slots = cache.length + torch.arange(5, device=dev)
    cos_sin = cache.rope_table.view(2, -1, layer.head_dim)[:, slots]  # (2, 5, hd)
    counts = {}
    for gemms in (False, True, False):  # the first call makes the attention mask, once (not counted)
        monkeypatch.setattr(prefix, "FUSED_GEMMS", gemms)
        rows, emb = torch.randn(1, 5, 64, device=dev), torch.randn(1, 5, 64, device=dev)
        with torch.no_grad(), OpCounter() as counter:
            cache._extend_fused(rows, emb, slots[None], cos_sin, cache.lengths, scratch=True)
        counts[gemms] = counter.pending
    assert counts[True] == {"addmm_": 3, "rms_qkv_rope": 1, "tree_attention": 1, "rms_gate_up_silu": 1}
    assert sum(counts[False].values()) == sum(counts[True].values()) + 4
