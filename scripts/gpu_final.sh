#!/usr/bin/env bash
# The shipped heads on the GPU: the tree optimizer's tree for them, then the same held-out prompts decoded with the
# new heads (that tree and a dynamic 64-node tree) and with the previous heads (their tree), one report each.
#   bash scripts/gpu_final.sh     (repo root, GPU machine, embedded model staged; results: $OUT/final.tgz)
set -o pipefail
source scripts/device_setup.sh
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/w_final}; mkdir -p "$OUT" "$W"
M="python3 -m medusa_llama"
NEW=medusa_llama/assets/heads/smollm2-135m-instruct
OLD=medusa_llama/assets/heads/smollm2-135m-instruct-sequential
P=${PROMPTS:-.prompts/heldout20.jsonl}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/card.txt"
timeout 150 $M tree --heads $NEW --accuracy $NEW/heads_accuracy_h200.json --sizes "${SIZES:-1,4,8,16,32,48,64,96,128}" \
  --out "$W/tree_cuda.json" 2>&1 | grep -v Loading | tail -14 | tee "$W/tree.txt"
bench() {  # name heads tree
  timeout 120 $M bench --heads "$2" --tree "$3" --prompts "$P" --limit 20 --max-new-tokens 256 \
    --out "$W/bench_$1/report.json" 2>&1 | grep -v Loading | tail -2 | tee "$W/bench_$1.txt"
}
[ -f "$W/tree_cuda.json" ] && bench new_opt $NEW "$W/tree_cuda.json"
bench new_dynamic64 $NEW dynamic64
bench new_tree64 $NEW tree64
bench old_tree128 $OLD $OLD/tree_cuda.json
tar czf "$OUT/final.tgz" -C "$W" .
