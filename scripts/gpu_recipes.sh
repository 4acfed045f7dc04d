#!/usr/bin/env bash
# Issue 9's training recipes on the GPU machine, in stages that each fit one device call (10 minutes).
# Run from the repo root: bash scripts/gpu_recipes.sh STAGE  (results under $OUT; sources scripts/device_setup.sh).
#   data: /tmp/data/sd-all, every ShareGPT first-turn prompt answered by the model itself (greedy, bf16, the batched
#         decoder), human answers dropped. Knobs: PROMPTS (default -1 = all), NEW (256), BLOCK (512), BATCH (512),
#         BUDGET (seconds of generation before no new prompt starts, 230), DEVICE (auto), HARD (hard stop, 300 s).
# A CPU dry run here: SETUP=0 (skip the GPU machine's wheel setup) PROMPTS=32 NEW=32 BATCH=16 bash scripts/gpu_recipes.sh data
set -o pipefail
[ "${SETUP:-1}" = 0 ] || source scripts/device_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M="python3 -m medusa_llama"
SD_ALL=${SD_ALL:-/tmp/data/sd-all}
case "$1" in
  data)
    timeout "${HARD:-300}" /usr/bin/time -f "prepare wall %e s" $M prepare --dataset sharegpt --out "$SD_ALL" --overwrite \
      --block-size "${BLOCK:-512}" --self-distill "${PROMPTS:--1}" --self-distill-only --max-new-tokens "${NEW:-256}" \
      --distill-batch-size "${BATCH:-512}" --distill-seconds "${BUDGET:-230}" ${DEVICE:+--device $DEVICE} 2>&1 \
      | tr '\r' '\n' | grep -v -e "it/s\]$" -e "answer/s" -e "rec/s" -e "^Loading" | tail -8 | tee "$OUT/data_sd_all.txt"
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(json.dumps({k: m[k] for k in ('records', 'self_distilled', 'self_distill', 'skipped')}))" \
      "$SD_ALL/meta.json" | tee -a "$OUT/data_sd_all.txt"
    ;;
  *)
    echo "usage: bash scripts/gpu_recipes.sh data" >&2; exit 2
    ;;
esac
