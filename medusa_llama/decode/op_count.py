"""Count the device kernels a decode step launches, per phase, on any device (the CPU included).

On a GPU the CUDA-graph step outside the verify forward is launch-bound: each small kernel costs ~2-4 us whatever
it does, so its cost is its kernel count. This counts them without a GPU: a ``TorchDispatchMode`` sees every aten op
(and every custom op: our Triton kernels) the step dispatches, after composite ops (``linear``, ``matmul``) have
decomposed into the ones that launch. Views, allocations and metadata ops launch nothing and are not counted; every
other op counts as one launch, as it does on CUDA for these shapes (a custom op counts as its Triton launches, one
each but the two-stage top-k over more than ``topk.CHUNK`` columns).

Run the decoder on its kernel path (``backbone.tree_kernel`` set before it is built; Triton's interpreter on a CPU)
to count what the GPU path launches: ``benchmarks/step_profile.py --count``.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medusa_llama.decode.decoder import PHASES, GenerationConfig, _Decoder

_FREE = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "set_",
    "resize_",
    "_reshape_alias",
    "_unsafe_view",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
}
"""aten ops that launch no kernel (besides views, which ``OpOverload.is_view`` names)."""


def launches(func, args) -> int:
    """Kernel launches of one dispatched op on CUDA: 0 for views and allocations, else 1 (the Triton top-k 1 or 2, the
    fused LM head + argmax 2)."""
    name = func._schema.name
    if name.startswith("aten::"):
        return 0 if func.is_view or name[6:] in _FREE else 1
    if name == "medusa_llama::topk_indices":
        from medusa_llama.decode.topk import CHUNK

        return 1 if args[0].shape[-1] <= CHUNK else 2
    if name == "medusa_llama::argmax_linear":  # the keys' fill, then the GEMM
        return 2
    return 1


class OpCounter(TorchDispatchMode):
    """Counts launches by op name into ``pending``; ``close(phase)`` files them under a phase."""

    def __init__(self):
        super().__init__()
        self.pending: Counter[str] = Counter()
        self.phases: dict[str, Counter[str]] = {phase: Counter() for phase in PHASES}
        self.syncs = 0  # ops that read a device value on the host: none may run in a CUDA-graph step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in ("aten::_local_scalar_dense", "aten::item", "aten::nonzero"):
            self.syncs += 1
        n = launches(func, args)
        if n:
            self.pending[name.split("::")[-1]] += n
        return func(*args, **(kwargs or {}))

    def close(self, phase: str) -> None:
        self.phases[phase].update(self.pending)
        self.pending.clear()


@torch.no_grad()
def count_step(decoder: _Decoder, prompt: list[int], config: GenerationConfig | None = None) -> OpCounter:
    """Prefill ``prompt``, run one eager decode step to warm up, then count the next under an ``OpCounter``; its
    ``phases`` hold the counts.

    The steps run as ``profile`` runs them (the same ``mark`` hooks, no graph); on a CPU that is the CPU path unless
    the decoder was built on its kernel path. The warm-up step makes what is made once and cached (as a CUDA graph's
    warm-up does), so the count is a replay's. Host syncs the CPU path makes by design (reading the cache length to
    attend over the filled slots only) are counted in ``syncs`` too."""
    acfg = (config or GenerationConfig()).acceptance_config()
    counter = OpCounter()
    step = decoder._make_step(acfg, counter.close)
    decoder._prefill(decoder._checked_prompt(prompt, 2 * (decoder._depth + 1)), acfg)
    step()
    counter = OpCounter()
    step = decoder._make_step(acfg, counter.close)
    with counter:
        step()
    return counter


def format_counts(counter: OpCounter, top: int = 8) -> str:
    """One line per phase: its launches and its most frequent ops."""
    lines = []
    for phase, ops in counter.phases.items():
        common = ", ".join(f"{name} {n}" for name, n in ops.most_common(top))
        lines.append(f"{phase:15s} {sum(ops.values()):4d}  {common}")
    outside = sum(sum(ops.values()) for phase, ops in counter.phases.items() if phase != "verify_forward")
    lines.append(f"{'outside verify':15s} {outside:4d}  (host syncs: {counter.syncs})")
    return "\n".join(lines)
