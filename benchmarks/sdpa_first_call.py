"""Why is the first token slow for some prompts? Time SDPA's first call on each new prompt length, per backend.

cuDNN's SDPA backend builds an execution plan per new shape; if PyTorch picks it, each new prompt length pays that
build once. Prints milliseconds of the first and second call per length, with all backends and with cuDNN off.
"""

import time

import torch
import torch.nn.functional as F


def first_calls(lengths, heads, kv_len, cudnn: bool, masked: bool, kv_heads=None) -> list[tuple[int, float, float]]:
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    rows = []
    for p in lengths:
        q = torch.randn(1, heads, p, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads or heads, kv_len or p, 64, device="cuda", dtype=torch.bfloat16)
        mask = None
        if masked:
            mask = torch.ones(p, kv_len or p, dtype=torch.bool, device="cuda").tril()
        if kv_heads:  # the backbone's prefill: GQA, additive mask
            mask = torch.zeros(1, 1, p, kv_len, device="cuda", dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(
                q, k, k, attn_mask=mask, is_causal=mask is None, enable_gqa=bool(kv_heads and kv_heads != heads)
            )
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        rows.append((p, *times))
    return rows


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    cases = (
        ("causal, no mask", 9, None, False, None),
        ("bool mask, 2048 slots", 9, 2048, True, None),
        ("GQA 9/3, additive, 2048", 9, 2048, True, 3),
    )
    first_calls([16], 9, None, False, None)  # CUDA context and kernels loaded once
    for label, heads, kv, masked, kv_heads in cases:
        for cudnn in (True, False):
            rows = first_calls([37 + 13 * i for i in range(6)], heads, kv, cudnn, masked, kv_heads)
            rows = rows[1:]  # the first length also pays the backend's one-time start
            first = sum(r[1] for r in rows) / len(rows)
            second = sum(r[2] for r in rows) / len(rows)
            print(f"{label:24s} cudnn={cudnn!s:5s}: first call {first:7.2f} ms, second {second:6.3f} ms")


if __name__ == "__main__":
    main()
