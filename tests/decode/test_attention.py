"""The Triton kernels equal their PyTorch references: tree attention against SDPA, the fused RMSNorm / rotary /
SwiGLU kernels against the model's PyTorch ops, and the backbone's kernel path against its PyTorch path.

On a CPU the kernels run in Triton's interpreter (fp32 and fp16, small shapes); on a GPU, compiled (bf16 too).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import FakeTokenizer, tiny_llama

pytest.importorskip("triton")

from medusa_llama.decode import attention, kernels  # noqa: E402
from medusa_llama.decode.backbone import make_backbone  # noqa: E402
from medusa_llama.decode.model import RMSNorm, rotate_half  # noqa: E402
from medusa_llama.decode.tree import build_tree, builtin_tree  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
if not ON_GPU and type(attention._split_kernel).__name__ != "InterpretedFunction":
    pytest.skip("Triton was imported before conftest set TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative norm error vs fp64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def random_tree_mask(t: int) -> torch.Tensor:
    """A (T, T) mask each node of which sees itself and a random subset of the earlier nodes (a superset of trees)."""
    return ((torch.rand(t, t) < 0.3) | torch.eye(t, dtype=torch.bool)).tril()


def case(t, cache_len, nh, n_kv, hd, dtype, s=512):
    q = torch.randn(1, t, nh, hd, device=DEV, dtype=dtype)
    k_cache = torch.randn(1, s, n_kv, hd, device=DEV, dtype=dtype)
    v_cache = torch.randn(1, s, n_kv, hd, device=DEV, dtype=dtype)
    k_cache[:, cache_len + t :] = float("nan")  # slots past the tree must never be read
    v_cache[:, cache_len + t :] = float("nan")
    mask = random_tree_mask(t).to(DEV)
    return q, k_cache, v_cache, torch.tensor(cache_len, device=DEV), mask


def reference(q, k_cache, v_cache, cache_len, mask):
    span = int(cache_len) + q.shape[1]
    return attention.tree_attention_sdpa(
        q.double(), k_cache[:, :span].double(), v_cache[:, :span].double(), cache_len, mask
    )


# T = 1, 3, 64, 128 over cache lengths that are no multiple of a block (64) or a split (128); the SmolLM2 head
# grouping (9 query heads over 3 KV heads, hd 64) where the interpreter is quick, narrower heads where T is large.
# (128, 5): the second split holds tree keys only, which the first tree rows may not see at all (empty split).
CASES = [
    (1, 77, 9, 3, 64),
    (3, 130, 9, 3, 64),
    (64, 200, 3, 1, 32),
    (128, 5, 4, 2, 16),
    (16, 0, 4, 2, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,cache_len,nh,n_kv,hd", CASES)
def test_tree_attention_matches_sdpa(t, cache_len, nh, n_kv, hd, dtype):
    torch.manual_seed(t + cache_len)
    if not ON_GPU and dtype != torch.float32 and t > 16:
        pytest.skip("interpreter time: half precision on the small cases only")
    args = case(t, cache_len, nh, n_kv, hd, dtype)
    out = attention.tree_attention(*args)
    assert out.shape == (1, t, nh, hd) and out.dtype == dtype
    assert rel_err(out, reference(*args)) < TOL[dtype]


def test_tree_attention_reads_cache_len_on_the_device():
    """One set of launch arguments, the length changed in place (as between CUDA-graph replays)."""
    torch.manual_seed(0)
    q, k_cache, v_cache, cache_len, mask = case(4, 100, 4, 2, 16, torch.float32)
    attention.tree_attention(q, k_cache, v_cache, cache_len, mask)
    cache_len.fill_(37)
    out = attention.tree_attention(q, k_cache, v_cache, cache_len, mask)
    assert rel_err(out, reference(q, k_cache, v_cache, cache_len, mask)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_model_ops(dtype):
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 96, device=DEV, dtype=dtype), torch.randn(2, 3, 96, device=DEV, dtype=dtype)
    norm = RMSNorm(96, 1e-5).to(DEV, dtype)
    torch.nn.init.normal_(norm.weight)
    h, out = kernels.add_rms_norm(x, y, norm.weight, norm.eps)
    torch.testing.assert_close(h, x + y, rtol=0, atol=0)
    torch.testing.assert_close(out, norm(x + y))
    _, out = kernels.add_rms_norm(x, None, norm.weight, norm.eps)
    torch.testing.assert_close(out, norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu_block", [2048, 32])  # a row in one program; three programs a row (the last partial)
def test_silu_mul_matches_model_ops(dtype, silu_block, monkeypatch):
    monkeypatch.setattr(kernels, "SILU_BLOCK", silu_block)
    torch.manual_seed(0)
    gate_up = torch.randn(5, 2 * 80, device=DEV, dtype=dtype) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_block", [1024, 32])  # a token's 9 heads in one program; 2 a program (the last 1)
def test_rope_cache_write_matches_model_ops(dtype, rope_block, monkeypatch):
    monkeypatch.setattr(kernels, "ROPE_BLOCK", rope_block)
    torch.manual_seed(0)
    b, t, nh, n_kv, hd, s = 1, 5, 5, 2, 16, 32
    qkv = torch.randn(b, t, (nh + 2 * n_kv) * hd, device=DEV, dtype=dtype)
    angles = torch.rand(b, t, hd // 2, device=DEV) * 6
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    slots = torch.tensor([3, 4, 5, 6, 7], device=DEV)
    k_cache, v_cache = torch.zeros(2, b, s, n_kv, hd, device=DEV, dtype=dtype)
    q = kernels.rope_cache_write(qkv, cos, sin, slots, k_cache, v_cache, nh)  # (B, T, nh, hd)
    q_ref, k_ref, v_ref = qkv.split([nh * hd, n_kv * hd, n_kv * hd], -1)
    q_ref, k_ref = (x.view(b, t, -1, hd) for x in (q_ref, k_ref))
    c, s_ = cos[:, :, None], sin[:, :, None]  # (B, T, 1, hd)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # one rounding vs 3
    torch.testing.assert_close(q, q_ref * c + rotate_half(q_ref) * s_, **tol)
    torch.testing.assert_close(k_cache[:, slots], k_ref * c + rotate_half(k_ref) * s_, **tol)
    torch.testing.assert_close(v_cache[:, slots], v_ref.view(b, t, n_kv, hd), rtol=0, atol=0)
    assert k_cache[:, :3].abs().sum() == 0 and v_cache[:, 8:].abs().sum() == 0  # no other slot written


def test_backbone_kernel_path_equals_pytorch_path():
    """The whole fast backbone with the kernels (tree attention, fused layers) against its PyTorch path, fp32."""
    hf = tiny_llama(seed=2).to(DEV)
    bb = make_backbone(hf, FakeTokenizer(), "tiny", 160, "fast")
    tree = build_tree(builtin_tree("tree32")).to(DEV)
    prompt = torch.randint(0, 96, (40,), device=DEV)
    tokens = torch.randint(0, 96, (tree.size,), device=DEV)
    outs = []
    for on in (False, True):
        bb.tree_kernel = bb.model.use_fused_kernels = on
        bb.prefill(prompt)
        outs.append(bb.logits(bb.forward_tree(tokens, tree.mask, tree.depth)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        attention.KernelConfig(16, 32, 4, 4, 1),
        attention.KernelConfig(32, 64, 1, 4, 3),
        attention.KernelConfig(16, 32, 1, 4, 3, merge_rows=4),  # merge programs of several rows
        attention.KernelConfig(16, 32, 2, 4, 3, merge_rows=64),  # one merge program per KV head
    ],
)
def test_tree_attention_any_tiles(config):
    """Every tile configuration the sweep may pick computes the same function."""
    torch.manual_seed(1)
    args = case(24, 150, 4, 2, 16, torch.float32)
    assert rel_err(attention.tree_attention(*args, config), reference(*args)) < 1e-5
