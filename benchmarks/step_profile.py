"""Where a decode call's time goes on the GPU: the prefill (time to first token) and the Medusa step, by phase.

Random weights of SmolLM2-135M's shape (timing does not depend on the values) with the shipped heads and tree, bf16.
Prints, for prompts of new lengths:
1. the prefill's wall time (host) against the sum of its kernels' device time: a prefill whose wall time is far above
   its kernel time is paying per-op host overhead (eager dispatch), not GPU work;
2. the first token of each decoder (``generate`` with one new token), as ``bench`` measures it;
3. the graph replays of the vanilla and the Medusa step (medians of interleaved rounds, as ``--steps-only``);
4. the Medusa step's kernels grouped by phase (eager, with ``torch.profiler``): how many kernels each phase launches
   and their device time.

Usage (GPU): python benchmarks/step_profile.py [--tree PATH] [--heads DIR] [--prefix-extend fused|unfused] [--detail]

``--steps-only`` prints section 3 alone: the step replays of every tree of ``--tree A,B,...`` and of every knob
variant (``--vary MODULE.NAME=VALUE``, repeatable: steps built with that knob set), in interleaved rounds, medians.

``--detail`` adds: 5. the vanilla step's kernels beside the Medusa step's, by phase and by kernel name (what the
Medusa step adds); 6. every kernel outside the verify forward, in launch order, with its device time; 7. graph
replays of the verify forward alone at several tree sizes (chain masks) and of the LM head + argmax.

``--count`` (any machine, no GPU needed): the kernels one Medusa step launches per phase, counted by dispatched op
(``decode/op_count.py``) on the same shapes with a two-layer backbone (the layer count changes only the verify
forward), in ``--dtype`` (bfloat16 by default). ``--path kernel`` (the default) counts the GPU's path, its Triton
kernels run by Triton's interpreter on a CPU; ``--path torch`` the PyTorch ops of the CPU path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--count" in sys.argv:  # Triton reads this when first imported (below, through the decoder's kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import LlamaConfig, LlamaForCausalLM

from medusa_llama.decode import prefix
from medusa_llama.decode.backbone import make_backbone
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder
from medusa_llama.decode.heads import MedusaHeads
from medusa_llama.decode.tree import load_choices

HEADS = Path(__file__).resolve().parents[1] / "medusa_llama/assets/heads/smollm2-135m-instruct"
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_shaped(layers: int = 30, device: str = "cuda", dtype=torch.bfloat16) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class Tok:
    eos_token_id = None


def kernel_ms(fn) -> tuple[float, float, int]:
    """(wall ms, summed kernel device ms, kernel count) of one call of ``fn``."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = 1e3 * (time.perf_counter() - t0)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return wall, sum(e.device_time for e in kernels) / 1e3, len(kernels)


def set_knob(item: str):
    """``MODULE.NAME=VALUE``: set a knob of ``medusa_llama.decode.MODULE`` (an int, float or bool literal), or
    ``attention.TUNED[HD,ROWS]=BM,BN,BPS,WARPS,STAGES[,MERGE_ROWS]`` one entry of the attention tile table (the
    value ``None`` removes it); returns the old value, in the same form."""
    import ast
    import importlib

    target, value = item.split("=", 1)
    if target.startswith("attention.TUNED["):
        from medusa_llama.decode.attention import TUNED, KernelConfig

        key = tuple(int(x) for x in target[len("attention.TUNED[") : -1].split(","))
        old = TUNED.get(key)
        TUNED.pop(key, None)
        if value != "None":
            TUNED[key] = KernelConfig(*(int(x) for x in value.split(",")))
        print(f"set attention.TUNED[{key}] = {TUNED.get(key)}")
        return "None" if old is None else ",".join(str(v) for v in vars(old).values())
    module, name = target.rsplit(".", 1)
    mod = importlib.import_module(f"medusa_llama.decode.{module}")
    if not hasattr(mod, name):
        raise SystemExit(f"--set/--vary: medusa_llama.decode.{module} has no {name}")
    old = getattr(mod, name)
    setattr(mod, name, ast.literal_eval(value))
    print(f"set medusa_llama.decode.{module}.{name} = {value}")
    return repr(old)


def timed(fn, reps: int = 1) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / reps


def count_kernels(args) -> None:
    """``--count``: kernels per phase of one Medusa step, counted by dispatched op (see the module docstring)."""
    from medusa_llama.decode.op_count import count_step, format_counts

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bb = make_backbone(smollm2_shaped(2, dev, DTYPES[args.dtype]), Tok(), NAME, 512, "fast")
    bb.tree_kernel = bb.model.use_fused_kernels = args.path == "kernel"
    heads = MedusaHeads.load(args.heads, device=dev, dtype=DTYPES[args.dtype])
    med = MedusaDecoder(bb, heads, load_choices(args.tree), use_cuda_graphs=False)
    prompt = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"one Medusa step, {args.path} path, prefix extend fused: {prefix.FUSED_EXTEND}; kernels per phase:")
    print(format_counts(count_step(med, prompt)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", default=str(HEADS))
    ap.add_argument("--tree", default=str(HEADS / "tree_cuda.json"))
    ap.add_argument(
        "--prefix-extend",
        choices=("fused", "unfused"),
        default="fused",
        help="the prefix layer's decode-step extend: fused Triton kernels (the default) or the PyTorch ops",
    )
    ap.add_argument("--detail", action="store_true", help="also sections 5-7 (see the module docstring)")
    ap.add_argument("--steps-only", action="store_true", help="only section 3 (the steps' graph replays)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE",
        help="set a decode module's knob first, e.g. kernels.ROPE_BLOCK=64 (an int, float or True/False); repeatable",
    )
    ap.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE",
        help="--steps-only: also time the steps built with this knob set (one variant each, repeatable); with "
        "--tree A,B,... every tree; the replays of all variants interleave, medians of --rounds rounds",
    )
    ap.add_argument("--rounds", type=int, default=7, help="--steps-only: timed rounds per step")
    ap.add_argument(
        "--replays",
        type=int,
        default=200,
        help="--steps-only: replays a round, from 300 cached (each adds its accepted tokens to the cache)",
    )
    ap.add_argument("--count", action="store_true", help="count kernels per phase instead (no GPU needed)")
    ap.add_argument("--path", choices=("kernel", "torch"), default="kernel", help="--count: the GPU's or the CPU's")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="--count: the dtype (casts count too)")
    args = ap.parse_args()
    prefix.FUSED_EXTEND = args.prefix_extend == "fused"
    for item in args.set:  # A/B a knob in one run: the same code with another value
        set_knob(item)
    if args.count:
        return count_kernels(args)
    print(torch.__version__, torch.cuda.get_device_name())
    bb = make_backbone(smollm2_shaped(), Tok(), NAME, 2048)
    heads = MedusaHeads.load(args.heads, device="cuda", dtype=torch.bfloat16)
    if args.steps_only:  # section 3 alone, for every tree and knob variant
        return variant_steps(bb, heads, args)
    van = VanillaDecoder(bb)
    med = MedusaDecoder(bb, heads, load_choices(args.tree))
    gen = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, 49152, (n,), generator=gen).tolist()

    one = GenerationConfig(max_new_tokens=1, stop_at_eos=False)
    van.generate(prompt(40), one), med.generate(prompt(41), one)  # capture both steps, warm everything
    print("\n## 1. prefill: wall vs kernel time (new lengths)")
    for n in (57, 96, 133, 250, 511):
        p = torch.tensor(prompt(n), device="cuda")
        wall, dev, count = kernel_ms(lambda p=p: bb.prefill(p))
        again = timed(lambda p=p: bb.prefill(p))
        print(f"P={n:4d}: first {wall:7.2f} ms wall, {dev:6.3f} ms in {count} kernels; again {again:.2f} ms")
    print("\n## 2. first token as bench measures it (generate, 1 new token), new lengths")
    for n in (58, 97, 134, 251):
        rv = van.generate(prompt(n), one)
        rm = med.generate(prompt(n + 1), one)
        print(f"P={n:4d}: vanilla {1e3 * rv.prefill_s:6.2f} ms, medusa {1e3 * rm.prefill_s:6.2f} ms")
    variant_steps(bb, heads, args)  # section 3, as --steps-only prints it
    cfg = GenerationConfig().acceptance_config()
    print("\n## 4. the Medusa step eager, by phase (torch.profiler over 10 steps; each phase a record_function)")
    med.generate(prompt(300), one)
    order = ["verify_forward", "lm_head", "acceptance", "commit", "proposal"]  # the step's mark() order
    state = {}

    def mark(phase: str) -> None:
        state["rf"].__exit__(None, None, None)
        if phase != order[-1]:
            state["rf"] = record_function(order[order.index(phase) + 1])
            state["rf"].__enter__()

    fn = med._make_step(cfg, mark)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            state["rf"] = record_function(order[0])
            state["rf"].__enter__()
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"{'phase':16s} {'device ms/step':>15s} {'host ms/step':>13s}")
    for e in events:
        if e.key in order:
            print(f"{e.key:16s} {e.device_time_total / 1e4:15.3f} {e.cpu_time_total / 1e4:13.3f}")
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
    total = sum(e.count for e in kernels) / 10
    busy = sum(e.device_time_total for e in kernels) / 1e4
    print(f"\n{total:.0f} kernels per step, {busy:.3f} ms of kernel time per step; top kernels (ms/step, count/step):")
    for e in kernels[:40]:
        print(f"{e.device_time_total / 1e4:8.4f} {e.count / 10:5.1f}  {e.key[:110]}")
    if args.detail:
        detail(bb, van, med, cfg, prompt)


def variant_steps(bb, heads, args) -> None:
    """Section 3 (alone with ``--steps-only``): graph replays of the vanilla and the Medusa step, 300 tokens cached,
    for every tree of ``--tree`` (comma-separated) and every knob variant (none, then each ``--vary``), each variant's
    steps built (captured) with its knob set. Rounds interleave all steps (drift hits all alike); each prints its
    median."""
    gen = torch.Generator().manual_seed(0)
    one = GenerationConfig(max_new_tokens=1, stop_at_eos=False)
    cfg = GenerationConfig().acceptance_config()
    steps = {}  # (variant, name) -> step
    for variant in [""] + args.vary:
        old = set_knob(variant) if variant else None
        decoders = [("vanilla", VanillaDecoder(bb))]
        decoders += [(tree, MedusaDecoder(bb, heads, load_choices(tree))) for tree in args.tree.split(",")]
        for name, dec in decoders:
            dec.generate(torch.randint(0, 49152, (300,), generator=gen).tolist(), one)  # capture, warm
            steps[variant, name] = dec
        if variant:
            set_knob(f"{variant.split('=')[0]}={old}")
    times = {key: [] for key in steps}
    prompt = torch.randint(0, 49152, (300,), generator=gen).tolist()
    for _ in range(args.rounds):
        for key, dec in steps.items():
            dec.generate(prompt, one)  # 300 cached again
            step = dec._step_for(cfg)
            for _ in range(3):
                step()
            times[key].append(timed(step, args.replays))
    print(f"\n## 3. steps (graph replays from 300 tokens cached, {args.replays} a round; median of {args.rounds}, ms)")
    for variant in [""] + args.vary:
        van = statistics.median(times[variant, "vanilla"])
        line = f"{variant or 'default':40s} vanilla {van:.4f}"
        for tree in args.tree.split(","):
            med = statistics.median(times[variant, tree])
            line += f" | {tree} {med:.4f} = {med / van:.3f}x"
        print(line)


def phase_kernels(dec, cfg, steps: int = 10) -> dict[str, list[tuple[str, float]]]:
    """One decoder's eager step under the profiler: its kernels by phase, in launch order, as (name, device us) per
    step (the mean of ``steps`` steps). Phases are the step's ``mark()`` calls, found on the GPU's timeline."""
    order = ["verify_forward", "lm_head", "acceptance", "commit", "proposal"]
    state = {}

    def mark(phase: str) -> None:
        state["rf"].__exit__(None, None, None)
        nxt = order.index(phase) + 1
        if nxt < len(order) and not (phase == "commit" and isinstance(dec, VanillaDecoder)):
            state["rf"] = record_function(order[nxt])
            state["rf"].__enter__()

    fn = dec._make_step(cfg, mark)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            state["rf"] = record_function(order[0])
            state["rf"].__enter__()
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    ranges = sorted(
        (e.time_range.start, e.time_range.end, e.key) for e in events if e.key in order and e.device_type.name == "CUDA"
    )
    kernels = sorted(
        (e.time_range.start, e.key, e.device_time)
        for e in events
        if e.device_type.name == "CUDA" and e.key not in order
    )
    by_phase: dict[str, list[tuple[str, float]]] = {p: [] for p in order}
    for start, name, us in kernels:
        phase = next((p for s, t, p in ranges if s <= start <= t), "?")
        by_phase.setdefault(phase, []).append((name, us / steps))
    return by_phase


def detail(bb, van, med, cfg, prompt) -> None:
    """Sections 5-7 (``--detail``)."""
    from collections import defaultdict

    from medusa_llama.decode.decoder import StepRunner

    one = GenerationConfig(max_new_tokens=1, stop_at_eos=False)
    phases = {}
    for name, dec in (("vanilla", van), ("medusa", med)):
        dec.generate(prompt(300), one)
        phases[name] = phase_kernels(dec, cfg)
    print("\n## 5. vanilla vs Medusa step, eager kernels (us per step; count)")
    for phase in ["verify_forward", "lm_head", "acceptance", "commit", "proposal", "?"]:
        v, m = phases["vanilla"].get(phase, []), phases["medusa"].get(phase, [])
        vs, ms = sum(u for _, u in v), sum(u for _, u in m)
        print(f"{phase:16s} vanilla {vs:8.1f} us {len(v) / 10:5.1f} | medusa {ms:8.1f} us {len(m) / 10:5.1f}")
    for name in ("vanilla", "medusa"):
        agg = defaultdict(lambda: [0.0, 0])
        for _, ks in phases[name].items():
            for k, us in ks:
                agg[k][0] += us
                agg[k][1] += 1
        phases[name + "_agg"] = agg
    va, ma = phases["vanilla_agg"], phases["medusa_agg"]
    print("\nby kernel name: medusa us (count) | vanilla us (count) | difference us")
    rows = sorted(set(va) | set(ma), key=lambda k: -(ma[k][0] - va[k][0]))
    for k in rows:
        m, v = ma[k], va[k]
        print(f"{m[0]:8.1f} ({m[1] / 10:5.1f}) | {v[0]:8.1f} ({v[1] / 10:5.1f}) | {m[0] - v[0]:+8.1f}  {k[:90]}")
    print("\n## 6. kernels outside the verify forward, launch order (us per step)")
    for name in ("vanilla", "medusa"):
        print(f"-- {name}")
        for phase in ["lm_head", "acceptance", "commit", "proposal"]:
            ks = phases[name].get(phase, [])
            # the profiler saw 10 steps (each entry's us already divided by 10): launch i's mean over the steps
            per = len(ks) // 10
            for i in range(per):
                us = sum(ks[i + j * per][1] for j in range(10))
                print(f"  {phase:12s} {us:7.2f}  {ks[i][0][:100]}")
    print("\n## 7. graph replays: the verify forward alone by tree size (chain mask), LM head + argmax")
    dev = bb.device
    bb.prefill(torch.tensor(prompt(300), device=dev))
    for t in (1, 4, 16, 32, 64, 128):
        tokens = torch.randint(0, 49152, (t,), device=dev)
        mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        depth = torch.arange(t, device=dev)
        r = StepRunner(lambda tokens=tokens, mask=mask, depth=depth: bb.forward_tree(tokens, mask, depth), True)
        r.capture()
        print(f"T={t:4d}: forward {timed(r, 200):.3f} ms")
    for t in (1, 64):
        h = torch.randn(t, bb.hidden_size, device=dev, dtype=bb.dtype)
        r1 = StepRunner(lambda h=h: bb.logits(h), True)
        r2 = StepRunner(lambda h=h: bb.logits(h).argmax(-1), True)
        r3 = StepRunner(lambda h=h: bb.lm_head(h), True)
        for r in (r1, r2, r3):
            r.capture()
        print(
            f"T={t:4d}: lm_head bf16 {timed(r3, 500) * 1e3:.1f} us, + float() {timed(r1, 500) * 1e3:.1f} us, "
            f"+ argmax {timed(r2, 500) * 1e3:.1f} us"
        )


if __name__ == "__main__":
    main()
