#!/usr/bin/env bash
# The shipped heads on the GPU: gpu_check (kernels, graphs and prefix heads against the references), then the same
# held-out prompts decoded with each setting in BENCHES (one `bench` report each).
#   bash scripts/gpu_final.sh     (repo root, GPU machine, embedded model staged; results: $OUT/final.tgz)
# BENCHES: lines "name|bench flags"; TREE_OPT=1 also reruns the tree optimizer for the shipped heads first.
set -o pipefail
source scripts/device_setup.sh
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/w_final}; mkdir -p "$OUT" "$W"
M="python3 -m medusa_llama"
NEW=medusa_llama/assets/heads/smollm2-135m-instruct
P=${PROMPTS:-.prompts/heldout20.jsonl}
BENCHES=${BENCHES:-"
new_tree64|--tree tree64
"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/card.txt"
[ "${CHECK:-1}" = 1 ] && timeout 180 python3 benchmarks/gpu_check.py --no-embedded > "$W/gpu_check.txt" 2>&1
grep -v "^ok" "$W/gpu_check.txt" | grep -v "Warning\|warn" | tail -5
if [ "${TREE_OPT:-0}" = 1 ]; then
  timeout 150 $M tree --heads $NEW --accuracy $NEW/heads_accuracy_h200.json --prompts "$P" \
    --sizes "${SIZES:-1,4,8,16,32,48,64,96,128}" --out "$W/tree_cuda.json" 2>&1 | grep -v Loading | tail -14 | tee "$W/tree.txt"
fi
while IFS='|' read -r name flags; do
  [ -n "$name" ] || continue
  timeout 120 $M bench $flags --prompts "$P" --limit 20 --max-new-tokens 256 --out "$W/bench_$name/report.json" 2>&1 \
    | grep -v Loading | tail -2 | head -1 | tee "$W/bench_$name.txt"
done <<< "$BENCHES"
tar czf "$OUT/final.tgz" -C "$W" .
