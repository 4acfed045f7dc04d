"""Linear layers for decoding on a CPU: weights prepacked once for oneDNN.

A decode step multiplies 1 to T hidden states by every weight of the model, and by the LM head's (V, D) weight once
for the tree's logits and once more per head depth for the heads' proposals (sequential heads project through the
shared LM head). On a CPU these products cost the time to read the weights (SmolLM2's LM head: 49,152 x 576, 113 MB
in fp32). torch's dense ``F.linear`` (MKL sgemm) reads them about once per row for small batches and repacks them at
every call: on this project's 2-core AMD EPYC, one thread, the LM head took 7.0 ms for 1 row, 14.8 ms for 2, 12.3 ms for
4. With the weight reordered once into oneDNN's blocked layout, every batch from 1 to 4 rows costs one read: 3.6 /
4.0 / 3.7 ms. So a verify forward of a few tree tokens costs little more than a one-token step, as on a GPU: SmolLM2's
forward, 2 threads, went from 32.6 ms for 1 token and 54.3 ms for 2 to 18.8 and 20.6 ms.

Outputs equal ``F.linear`` up to fp32 rounding (a different summation order). The packed copy is made once from
frozen weights: later changes to ``linear.weight`` are not seen.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PACKED_BATCH = 4
"""The batch size oneDNN packs the weight for; measured as fast for 1 to 4 rows as packing for each size."""


class PackedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` by oneDNN over a prepacked weight; ``weight`` stays the original parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # shared, not copied: users read its dtype and device
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACKED_BATCH)  # opaque layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inductor cannot trace the prepacked tensor; it packs weights itself
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])  # (N, D)
        bias = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, bias, "none", [], "")  # (N, V)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., V)


def pack_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by ``pack_for_cpu(linear)``, in place. Returns how many."""
    packed = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                new = pack_for_cpu(child)
                setattr(parent, name, new)
                packed += new is not child
    return packed


def pack_for_cpu(linear: nn.Linear) -> nn.Module:
    """``linear`` as a ``PackedLinear`` when it is an fp32 layer on a CPU with oneDNN; otherwise ``linear`` itself."""
    w = linear.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return linear
    try:
        return PackedLinear(linear)
    except (RuntimeError, AttributeError) as exc:  # a build without the oneDNN linear ops
        log.debug("oneDNN weight packing unavailable (%s): the LM head stays a dense linear", exc)
        return linear
