"""Per-head validation top-1/top-5 of heads (+ the LoRA adapter beside them, merged) on the first N val blocks.

    python results/cpu/medusa2/heads_top1.py HEADS_DIR 40

Targets are the data tokens (self-distilled by the original model), batch 1, fp32 on the CPU; every run is scored on
the same blocks, so the rows compare (the trainer's own evals used 4 blocks only).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from medusa_llama.decode.heads import MedusaHeads
from medusa_llama.pipeline import adapter_dir_of, load_pipeline_backbone
from medusa_llama.train.blocks import TokenBlocks
from medusa_llama.train.objective import MedusaObjective

heads_dir, n = Path(sys.argv[1]), int(sys.argv[2])
bb = load_pipeline_backbone(None, "cpu", "float32", adapter=adapter_dir_of(heads_dir))
heads = MedusaHeads.load(heads_dir).eval()
obj = MedusaObjective(bb.hf_model, heads, soft_targets=False)
blocks = TokenBlocks("/tmp/data/sd-all", "val")
K = heads.num_heads
corr, cnt = torch.zeros(K, 2), torch.zeros(K)
with torch.no_grad():
    for b in range(n):
        tokens, mask = blocks[np.arange(b, b + 1)]
        out = obj(tokens, mask, joint=False, metrics=True)
        corr += out["head_correct"]
        cnt += out["head_count"]
top1, top5 = (corr[:, 0] / cnt).tolist(), (corr[:, 1] / cnt).tolist()
result = {"heads": str(heads_dir), "val_blocks": n, "top1": top1, "top5": top5, "positions_head0": float(cnt[0])}
print(json.dumps(result))
