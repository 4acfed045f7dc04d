"""Decoding speed of the fast backbone: vanilla tokens/s (eager and CUDA-graph) against HF generate, and the
latency of one verify step against tree size, for the embedded SmolLM2-135M and a Llama-2-7B-shaped model
with random weights (timing does not depend on weight values).

    python benchmarks/decode_speed.py [--shapes smollm2 llama7b] [--out results.json]

On CPU run it with --shapes smollm2 --no-graph-check; timings from CPU are only meaningful as ratios in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import GenerationConfig, StepRunner, VanillaDecoder
from medusa_llama.decode.tree import DEFAULT_ACCURACY as ACC
from medusa_llama.decode.tree import build_tree, grow_tree
from medusa_llama.pipeline import load_pipeline_backbone

LLAMA7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def load(shape: str, device: str, dtype, max_seq_len: int):
    if shape == "smollm2":
        return load_pipeline_backbone(
            None, device, {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], max_seq_len
        )
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig(**LLAMA7B)).eval()
    torch.set_default_dtype(prev)

    class Tok:
        eos_token_id = None

    return make_backbone(hf, Tok(), "llama7b-random", max_seq_len)


def verify_latency(bb, sizes, cached: int, use_graph: bool, reps: int, compile: bool = False) -> dict[int, float]:
    """Median ms of one forward of T tree tokens (+ LM head) over ``cached`` cached tokens."""
    out = {}
    dev = bb.device
    prompt = torch.randint(0, bb.vocab_size, (cached,), device=dev)
    for t in sizes:
        tree = build_tree(grow_tree(ACC, t - 1)) if t > 1 else None
        mask = tree.mask.to(dev) if tree else torch.ones(1, 1, dtype=torch.bool, device=dev)
        depth = tree.depth.to(dev) if tree else torch.zeros(1, dtype=torch.long, device=dev)
        tokens = torch.randint(0, bb.vocab_size, (t,), device=dev)
        bb.prefill(prompt)
        sink = torch.zeros(t, dtype=torch.long, device=dev)

        def fn(tokens=tokens, mask=mask, depth=depth, sink=sink):
            sink.copy_(bb.logits(bb.forward_tree(tokens, mask, depth)).argmax(-1))

        step = StepRunner(torch.compile(fn, dynamic=False) if compile else fn, use_graph)
        step.capture()
        for _ in range(3):
            step()
        times = []
        for _ in range(reps):
            sync(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            times.append((time.perf_counter() - t0) * 1000)
        out[t] = round(statistics.median(times), 3)
    return out


def vanilla_speed(bb, use_graph: bool, new_tokens: int, prompt, compile: bool = False) -> float:
    dec = VanillaDecoder(bb, use_cuda_graphs=use_graph, compile=compile)
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    dec.generate(prompt, GenerationConfig(max_new_tokens=8, stop_at_eos=False))
    res = dec.generate(prompt, cfg)
    return round(len(res.tokens) / res.total_s, 1)


def hf_speed(bb, new_tokens: int, prompt) -> float:
    ids = torch.tensor([prompt], device=bb.device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    bb.hf_model.generate(ids, max_new_tokens=8, do_sample=False)
    sync(bb.device)
    t0 = time.perf_counter()
    bb.hf_model.generate(ids, **kw)
    sync(bb.device)
    return round(new_tokens / (time.perf_counter() - t0), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2", "llama7b"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16, 64, 128])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--cached", type=int, default=512)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd steps (slow to compile)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    results = {"device": card, "dtype": str(dtype), "cached_tokens": args.cached, "max_seq_len": args.max_seq_len}
    for shape in args.shapes:
        bb = load(shape, device, dtype, args.max_seq_len)
        prompt = torch.randint(0, bb.vocab_size, (64,)).tolist()
        r = {}
        r["vanilla_eager_tok_s"] = vanilla_speed(bb, False, args.new_tokens, prompt)
        if device == "cuda":
            r["vanilla_graph_tok_s"] = vanilla_speed(bb, True, args.new_tokens, prompt)
        r["hf_generate_tok_s"] = hf_speed(bb, min(args.new_tokens, 128), prompt)
        r["verify_ms_eager"] = verify_latency(bb, args.sizes, args.cached, False, max(5, args.reps // 5))
        if device == "cuda":
            r["verify_ms_graph"] = verify_latency(bb, args.sizes, args.cached, True, args.reps)
            if args.compile:
                t0 = time.perf_counter()
                r["vanilla_graph_compiled_tok_s"] = vanilla_speed(bb, True, args.new_tokens, prompt, compile=True)
                r["verify_ms_graph_compiled"] = verify_latency(bb, args.sizes, args.cached, True, args.reps, True)
                r["compile_and_measure_s"] = round(time.perf_counter() - t0, 1)
        results[shape] = r
        print(json.dumps({shape: r}), flush=True)
        del bb
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
