#!/usr/bin/env bash
# The GPU runs behind the README's measured figures, in stages that each fit one device call (10 minutes).
# Run from the repo root on the GPU machine: bash scripts/gpu_pipeline.sh STAGE  (results under $OUT).
set -o pipefail
source scripts/device_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M="python3 -m medusa_llama"
DATA=/tmp/data/sharegpt-sd
case "$1" in
  prep)
    timeout 300 python3 benchmarks/gpu_check.py 2>&1 | grep -v Loading | tee "$OUT/gpu_check.txt"
    /usr/bin/time -f "prepare wall %e s" $M prepare --dataset sharegpt --block-size 512 --self-distill "${SD:-3072}" \
      --max-new-tokens 256 --distill-batch-size 256 --out $DATA 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -8 | tee "$OUT/prepare.txt"
    ;;
  train)
    for spec in "seq sequential ${SEQ_STEPS:-1500}" "med medusa ${MED_STEPS:-800}"; do
      set -- $spec
      /usr/bin/time -f "train $1 wall %e s" $M train --data $DATA --head-kind $2 --lm-head shared --batch-size 16 \
        --max-steps $3 --eval-every 250 --save-every 500 --save-dir /tmp/runs/$1 2>&1 | tr '\r' '\n' \
        | grep -v "step/s\]$" | tail -6 | tee -a "$OUT/train.txt"
    done
    tar czf "$OUT/runs_m1.tgz" -C /tmp runs/seq/best runs/med/best
    ;;
  medusa2)
    python3 benchmarks/qlora_memory.py 2>&1 | tail -3 | tee "$OUT/qlora_memory.txt"
    /usr/bin/time -f "train m2 wall %e s" $M train --data $DATA --stage medusa2 --init-heads /tmp/runs/seq/best \
      --lora-r 8 --batch-size 16 --max-steps "${M2_STEPS:-600}" --eval-every 200 --save-dir /tmp/runs/m2 2>&1 \
      | tr '\r' '\n' | grep -v "step/s\]$" | tail -6 | tee "$OUT/train_m2.txt"
    python3 benchmarks/medusa2_quality.py --data $DATA --adapter /tmp/runs/m2/best 2>&1 | tail -2 | tee "$OUT/m2_quality.txt"
    tar czf "$OUT/runs_m2.tgz" -C /tmp runs/m2/best
    ;;
  eval)
    H=${HEADS:-/tmp/runs/seq/best}
    $M heads-accuracy --heads $H --skip 80 --limit 40 --out "$OUT/heads_accuracy.json" 2>&1 | tail -8
    $M tree --heads $H --accuracy "$OUT/heads_accuracy.json" --out "$OUT/tree_gpu.json" 2>&1 | tail -4
    python3 evaluate.py --heads $H --limit "${LIMIT:-40}" --max-new-tokens "${NEW:-256}" --tree "$OUT/tree_gpu.json" \
      --baselines hf --out /tmp/rep/report.json ${COMPILE:+--compile} 2>&1 | tail -6
    cp /tmp/rep/report.json "$OUT/report_gpu.json"; cp /tmp/rep/report.md "$OUT/report_gpu.md"
    ;;
  speed)
    python3 benchmarks/decode_speed.py --out "$OUT/decode_speed.json" ${COMPILE:+--variants torch kernels torch+compile kernels+compile} 2>&1 | tail -12
    ;;
esac
