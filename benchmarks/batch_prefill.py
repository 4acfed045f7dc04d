"""Batched prefill side by side: ``BatchedDecoder.add`` one prompt at a time (one forward each) against one
``add_many`` (one right-padded forward per group of ``--prefill-tokens``), same model, same prompts, one run.
Prints the seconds of each, the ratio, and whether both chose the same first tokens.

    python benchmarks/batch_prefill.py --prompts 64 --min-len 20 --max-len 200      # CPU, embedded model, fp32

``--prefill graph`` times the CUDA-graph prefill (``BatchedDecoder(graph_prefill=True)``, a GPU only; its graphs
captured before any clock), ``--prefill both`` the eager one and it side by side, same prompts, and the ratios:

    python benchmarks/batch_prefill.py --prompts 64 --prefill both                  # GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from medusa_llama.decode.batch import BatchedDecoder
from medusa_llama.decode.decoder import GenerationConfig
from medusa_llama.pipeline import load_pipeline_backbone


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--prefill-tokens", type=int, default=None, help="default: the decoder's for the device")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prefill", choices=("eager", "graph", "both"), default="eager", help="eager, CUDA graphs, or both")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    backbone = load_pipeline_backbone(args.model, args.device, "auto", args.max_len + 16, "fast")
    g = torch.Generator().manual_seed(0)  # ShareGPT-like lengths; random ids (prefill cost does not read them)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, backbone.vocab_size, (n,), generator=g).tolist() for n in lengths]
    cfg = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    modes = ["eager", "graph"] if args.prefill == "both" else [args.prefill]
    best: dict[str, float] = {}
    firsts: dict[str, list[int]] = {}
    for mode in modes:
        dec = BatchedDecoder(backbone, args.prompts, prefill_tokens=args.prefill_tokens, graph_prefill=mode == "graph")
        if mode == "graph" and not dec.padded_prefill:
            print("graph prefill needs CUDA graphs (a GPU): skipped")
            continue

        def release_all(dec: BatchedDecoder = dec) -> None:
            for row in set(range(dec.capacity)) - set(dec.free_rows()):
                dec.release(row)

        def one_by_one(dec: BatchedDecoder = dec, mode: str = mode) -> None:
            rows = [dec.add(q, cfg) for q in prompts]
            firsts[f"{mode} add"] = [dec.result(r).tokens[0] for r in rows]

        def together(dec: BatchedDecoder = dec, mode: str = mode) -> None:
            rows = dec.add_many(prompts, cfg)
            firsts[f"{mode} add_many"] = [dec.result(r).tokens[0] for r in rows]

        captured = dec.capture_prefills(args.max_len, cfg)  # every bucket (graph prefill), before any clock
        for fn in (one_by_one, together):  # warm-up (and the step's graph)
            fn()
            release_all()
        for name, fn in ((f"{mode} add", one_by_one), (f"{mode} add_many", together)):
            for _ in range(args.repeats):
                best[name] = min(best.get(name, float("inf")), timed(fn))
                release_all()
        print(
            f"{mode} prefill: {args.prompts} prompts ({min(lengths)}-{max(lengths)} tokens, {sum(lengths)} in all), "
            f"{backbone.name}, {backbone.device} {backbone.dtype}, {torch.get_num_threads()} threads, prefill_tokens "
            f"{dec.prefill_tokens}, best of {args.repeats}" + (f", {captured} graphs captured" if captured else "")
        )
        add, many = best[f"{mode} add"], best[f"{mode} add_many"]
        print(f"  one by one (add): {add:.3f} s; add_many: {many:.3f} s; add / add_many: {add / many:.2f}x")
    names = list(firsts)
    if len(modes) > 1 and all(f"graph {k}" in best for k in ("add", "add_many")):
        for k in ("add", "add_many"):
            print(f"{k}: eager / graph {best[f'eager {k}'] / best[f'graph {k}']:.2f}x")
    print(f"same first tokens ({', '.join(names)}): {all(firsts[n] == firsts[names[0]] for n in names)}")


if __name__ == "__main__":
    main()
