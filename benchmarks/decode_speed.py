"""Step latency of the fast backbone on a GPU, PyTorch path against kernel path: the vanilla decode step, one verify
forward by tree size, and attention alone, for a SmolLM2-135M-shaped and a Llama-2-7B-shaped model with random
weights (timing does not depend on weight values), bf16, ``--cached`` tokens in the cache.

    python benchmarks/decode_speed.py [--shapes smollm2 llama7b] [--variants torch kernels] [--out speed.json]

Variants: ``torch`` (SDPA with a dense mask over the whole static cache, unfused layers: the path before the
kernels), ``attn`` (the split-K tree-attention kernel only), ``kernels`` (that and the fused RMSNorm / rotary /
SwiGLU kernels: the GPU default), and either with ``+compile`` (the step torch.compile'd before capture). Every
figure is a CUDA-graph replay, timed by CUDA events over ``--reps`` replays, median of ``--rounds``. Results are
written after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import StepRunner
from medusa_llama.decode.model import tree_attention_mask
from medusa_llama.decode.tree import DEFAULT_ACCURACY, build_tree, grow_tree

SHAPES = {
    "smollm2": dict(  # SmolLM2-135M-Instruct
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama7b": dict(  # Llama-2-7B
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
}


class _Tok:
    eos_token_id = None


def random_backbone(shape: str, max_seq_len: int):
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).eval()
    torch.set_default_dtype(prev)
    return make_backbone(hf, _Tok(), f"{shape}-random", max_seq_len, "fast")


def set_variant(bb, variant: str) -> bool:
    """Switch the backbone's paths; returns whether to torch.compile the step."""
    base, _, comp = variant.partition("+")
    bb.tree_kernel = base in ("attn", "kernels")
    bb.model.use_fused_kernels = base == "kernels"
    return comp == "compile"


def time_graph(fn, reps: int, rounds: int, before_round=None) -> float:
    """Median over rounds of the mean ms of one CUDA-graph replay of ``fn``."""
    runner = StepRunner(fn, use_graph=True)
    if before_round:
        before_round()
    runner.capture()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds + 1):  # the first round warms up
        if before_round:
            before_round()
        start.record()
        for _ in range(reps):
            runner()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return round(statistics.median(times[1:]), 4)


def tree_inputs(t: int):
    tree = build_tree(grow_tree(DEFAULT_ACCURACY, t - 1)) if t > 1 else None
    mask = tree.mask.cuda() if tree else torch.ones(1, 1, dtype=torch.bool, device="cuda")
    depth = tree.depth.cuda() if tree else torch.zeros(1, dtype=torch.long, device="cuda")
    return mask, depth


def step_latencies(bb, sizes, cached: int, compile: bool, reps: int, rounds: int) -> dict:
    """``vanilla_step``: forward of one token + LM head + argmax + commit (the vanilla decoder's step);
    ``verify[T]``: forward of a T-node tree + LM head + argmax (the Medusa step's verify part)."""
    prompt = torch.randint(0, bb.vocab_size, (cached,), device="cuda")
    bb.prefill(prompt)
    wrap = (lambda f: torch.compile(f, dynamic=False)) if compile else (lambda f: f)
    out = {}
    root = torch.zeros(1, dtype=torch.long, device="cuda")
    one, zero = tree_inputs(1)

    def vanilla():
        hidden = bb.forward_tree(root, one, zero)
        bb.commit(zero, zero[0])
        root.copy_(bb.logits(hidden).argmax(-1))

    t0 = time.perf_counter()
    out["vanilla_step"] = time_graph(wrap(vanilla), reps, rounds, lambda: bb.cache_len.fill_(cached))
    out["first_capture_s"] = round(time.perf_counter() - t0, 1)
    out["verify"] = {}
    for t in sizes:
        mask, depth = tree_inputs(t)
        tokens = torch.randint(0, bb.vocab_size, (t,), device="cuda")
        sink = torch.zeros(t, dtype=torch.long, device="cuda")

        def verify(tokens=tokens, mask=mask, depth=depth, sink=sink):
            sink.copy_(bb.logits(bb.forward_tree(tokens, mask, depth)).argmax(-1))

        bb.cache_len.fill_(cached)
        out["verify"][t] = time_graph(wrap(verify), reps, rounds)
    return out


def attention_only(shape: str, sizes, cached: int, max_seq_len: int, reps: int, rounds: int) -> dict:
    """One verify step's attention calls (one per layer) alone, in a graph: SDPA with the dense additive mask over
    all slots (the PyTorch path) against the split-K kernel over the live slots."""
    from medusa_llama.decode.attention import tree_attention

    cfg = SHAPES[shape]
    n_layers, nh, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // nh
    caches = torch.randn(2, n_layers, 1, max_seq_len, n_kv, hd, device="cuda", dtype=torch.bfloat16)
    cache_len = torch.tensor(cached, device="cuda")
    out = {"sdpa_dense_mask": {}, "kernel": {}}
    for t in sizes:
        tree, _ = tree_inputs(t)
        q = torch.randn(1, t, nh, hd, device="cuda", dtype=torch.bfloat16)
        tm8 = tree.to(torch.int8)

        def sdpa(q=q, tree=tree):
            mask = tree_attention_mask(cache_len, tree, max_seq_len, torch.bfloat16)  # once per step
            for i in range(n_layers):
                k, v = caches[0, i].transpose(1, 2), caches[1, i].transpose(1, 2)  # (1, n_kv, S, hd)
                torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=nh != n_kv
                )

        def kernel(q=q, tm8=tm8):
            for i in range(n_layers):
                tree_attention(q, caches[0, i], caches[1, i], cache_len, tm8)

        out["sdpa_dense_mask"][t] = time_graph(sdpa, reps, rounds)
        out["kernel"][t] = time_graph(kernel, reps, rounds)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2", "llama7b"], choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=["torch", "attn", "kernels"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16, 64, 128])
    ap.add_argument("--sizes-7b", nargs="+", type=int, default=[1, 64], help="tree sizes for the 7B shape")
    ap.add_argument("--compile-sizes", nargs="+", type=int, default=[64], help="tree sizes for +compile variants")
    ap.add_argument("--compile-all-shapes", action="store_true", help="compiled variants for every shape")
    ap.add_argument("--cached", type=int, default=512)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "cached_tokens": args.cached,
        "max_seq_len": args.max_seq_len,
        "weights": "random",
    }

    def save(key, value):
        results[key] = value
        print(json.dumps({key: value}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    for shape in args.shapes:
        sizes = args.sizes if shape == "smollm2" else args.sizes_7b
        save(f"{shape}/attention_ms", attention_only(shape, sizes, args.cached, args.max_seq_len, 50, args.rounds))
    # compiled variants last (each compiles for minutes), and on the first shape only unless --compile-all-shapes
    jobs = [(s, v) for s in args.shapes for v in args.variants if "+compile" not in v]
    compile_shapes = args.shapes if args.compile_all_shapes else args.shapes[:1]
    jobs += [(s, v) for s in compile_shapes for v in args.variants if "+compile" in v]
    bb, built = None, None
    for shape, variant in jobs:
        if built != shape:
            del bb
            torch.cuda.empty_cache()
            bb, built = random_backbone(shape, args.max_seq_len), shape
        compile = set_variant(bb, variant)
        sizes = args.compile_sizes if compile else args.sizes if shape == "smollm2" else args.sizes_7b
        try:
            r = step_latencies(bb, sizes, args.cached, compile, args.reps, args.rounds)
        except Exception as exc:  # one broken variant must not lose the others' numbers
            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        save(f"{shape}/{variant}", r)
    print("\n| shape/variant | vanilla step | " + " | ".join(f"T={t}" for t in args.sizes) + " |")
    for key, r in results.items():
        if isinstance(r, dict) and "vanilla_step" in r:
            cells = [str(r["verify"].get(t, "")) for t in args.sizes]
            print(f"| {key} | {r['vanilla_step']} | " + " | ".join(cells) + " |")
        elif isinstance(r, dict) and "kernel" in r:
            for k, v in r.items():
                print(f"| {key} {k} | | " + " | ".join(str(v.get(t, "")) for t in args.sizes) + " |")


if __name__ == "__main__":
    main()
