#!/usr/bin/env bash
# Issue 10's GPU runs in one call of the device tool, everything written under $OUT (json + txt):
#   1. batch_throughput: batched Medusa (candidate trees) vs batched vanilla per B, and the server's tree table
#      for this device type: $OUT/serve_trees.json starts as the shipped table and gets this device type's entry, so
#      it can replace medusa_llama/assets/heads/smollm2-135m-instruct/serve_trees.json as it is
#   2. serve_throughput: concurrent streaming clients against the server, Medusa (the table's tree) vs vanilla,
#      and the one-client server overhead against generate
#   3. batch_agreement: bf16 greedy outputs, batched vs batch-size-1 and Medusa vs vanilla
# Usage (repo root, on the GPU machine, carrying .whl* and .stage*):
#   source scripts/device_setup.sh && bash scripts/gpu_serving.sh
# Each part runs under `timeout`; defaults fit about 8 minutes on an H200 (about 5.5 expected). The variables below
# shrink or grow it; e.g. a CPU dry run:
#   OUT=/tmp/dry BT_SIZES=1,2 BT_PROMPTS=2 BT_TOKENS=8 BT_CANDIDATES=default,2 SV_LEVELS=1,2 SV_PROMPTS=2 \
#   SV_TOKENS=8 SV_OVERHEAD=1 AG_PROMPTS=2 AG_TOKENS=8 AG_B=2 bash scripts/gpu_serving.sh
set -u
OUT=${OUT:-/tmp/gpu_serving}
mkdir -p "$OUT"
PY=${PY:-python3}
BT_SIZES=${BT_SIZES:-1,4,8,16,32}       # batch sizes of the tree table
BT_PROMPTS=${BT_PROMPTS:-16}            # held-out prompts per batch size (at least B)
BT_TOKENS=${BT_TOKENS:-256}             # new tokens per prompt
BT_CANDIDATES=${BT_CANDIDATES:-default,64,16,4}  # trees tried per B (vanilla always)
BT_HEADS=${BT_HEADS:-}                  # heads of part 1 (empty: the shipped default heads)
BT_PREFILL=${BT_PREFILL:-graph}         # the batched prefill of part 1: graph (the server's), eager or both
T_TREES=${T_TREES:-240}                 # seconds for part 1 (it stops starting measurements 45 s before)
SV_LEVELS=${SV_LEVELS:-1,8,32}          # concurrent clients (= server batch size)
SV_PROMPTS=${SV_PROMPTS:-8}             # requests per level (at least 2 per client)
SV_TOKENS=${SV_TOKENS:-256}
SV_OVERHEAD=${SV_OVERHEAD:-4}           # prompts of the one-client overhead figure (0: skip)
T_SERVE=${T_SERVE:-150}
AG_B=${AG_B:-8}
AG_PROMPTS=${AG_PROMPTS:-20}
AG_TOKENS=${AG_TOKENS:-128}
T_AGREE=${T_AGREE:-90}
LOG="$OUT/gpu_serving.txt"

part() {  # part NAME SECONDS CMD...: run under timeout, output to $OUT/NAME.txt and the console, rc and time to $LOG
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  grep -v "Loading weights" "$OUT/$name.txt" | tail -n 40
  echo "== $name: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$LOG"
}

{
  date -u
  git log --oneline -1 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import fastapi, uvicorn, pydantic; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, \
'pydantic', pydantic.__version__)" 2>&1 | tail -n 1
} | tee -a "$LOG"

SHIPPED=medusa_llama/assets/heads/smollm2-135m-instruct/serve_trees.json
[ -f "$SHIPPED" ] && [ ! -f "$OUT/serve_trees.json" ] && cp "$SHIPPED" "$OUT/serve_trees.json" && chmod u+w "$OUT/serve_trees.json"
part batch_throughput "$T_TREES" $PY benchmarks/batch_throughput.py --batch-sizes "$BT_SIZES" \
  --prompts "$BT_PROMPTS" --max-new-tokens "$BT_TOKENS" --candidates "$BT_CANDIDATES" --prefill "$BT_PREFILL" \
  ${BT_HEADS:+--heads "$BT_HEADS"} \
  --budget-s $(( T_TREES > 90 ? T_TREES - 45 : T_TREES / 2 )) \
  --write-serve-trees "$OUT/serve_trees.json" --out "$OUT/batch_throughput.json"

TABLE=()
[ -f "$OUT/serve_trees.json" ] && TABLE=(--tree-table "$OUT/serve_trees.json")
part serve_throughput "$T_SERVE" $PY benchmarks/serve_throughput.py --concurrency "$SV_LEVELS" \
  --prompts "$SV_PROMPTS" --max-new-tokens "$SV_TOKENS" --overhead-prompts "$SV_OVERHEAD" "${TABLE[@]}" \
  --out "$OUT/serve_throughput.json"

part batch_agreement "$T_AGREE" $PY benchmarks/batch_agreement.py --batch-size "$AG_B" --prompts "$AG_PROMPTS" \
  --max-new-tokens "$AG_TOKENS" --out "$OUT/batch_agreement.json"

ls -l "$OUT" | tee -a "$LOG"
