#!/usr/bin/env bash
# Issue 9's GPU runs: head recipes trained side by side on the GPUs of one host, then each measured on the same
# held-out prompts. Run from the repo root on the GPU machine, after `scripts/gpu_recipes.sh data` built $DATA:
#   bash scripts/gpu_heads.sh train|eval|ddp      (results under $OUT; ddp: one recipe on NPROC GPUs, DDP)
#   bash scripts/gpu_heads.sh pack NAME...        (NAME's best heads, bf16 for transport only, one tgz each)
# Each recipe changes one thing against the one before it (see RECIPES); a GPU runs its queue in order, or PER_GPU
# queues side by side (a small model's training step is host-bound: two runs share one GPU at little cost each).
# A run stopped by TMAX (a device call's limit) continues from its last checkpoint when `train` runs again.
# The device returns at most 8 files a call, so each stage writes into $W and ends with one $OUT/<stage>.tgz.
set -o pipefail
[ "${SETUP:-1}" = 0 ] || source scripts/device_setup.sh  # SETUP=0: a CPU dry run, as in gpu_recipes.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=${W:-/tmp/w_heads}; mkdir -p "$W"
M="python3 -m medusa_llama"
DATA=${DATA:-/tmp/data/sd-all}
RUNS=${RUNS:-/tmp/runs}
STEPS=${STEPS:-1500}
PROMPTS=${PROMPTS:-.prompts/heldout20.jsonl}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$NGPU" -ge 1 ] || NGPU=1
NQ=$((NGPU * ${PER_GPU:-1}))  # queues: queue q runs on GPU q % NGPU

# name | flags (on top of: --data $DATA --batch-size ${BS:-16} --max-steps $STEPS)
RECIPES=${RECIPES:-"
sd|
sd_soft|--soft-targets
sd_prefix|--prefix-attention
sd_soft_prefix|--soft-targets --prefix-attention
sd_soft_prefix_l2|--soft-targets --prefix-attention --num-layers 2
"}

train_one() {  # name flags...
  local name=$1; shift
  grep -qs '"event": "done"' "$RUNS/$name/log.jsonl" && return  # finished in an earlier call
  local resume=""; [ -d "$RUNS/$name/last" ] && resume=--resume
  /usr/bin/time -f "train $name wall %e s" timeout "${TMAX:-540}" $M train --data "$DATA" --batch-size ${BS:-16} \
    --max-steps "$STEPS" --eval-every "${EVERY:-500}" --save-every "${EVERY:-500}" --save-dir "$RUNS/$name" $resume \
    "$@" 2>&1 | tr '\r' '\n' | grep -v "step/s\]$" | tail -5 >> "$W/train_$name.txt"
  cp "$RUNS/$name/log.jsonl" "$W/log_$name.jsonl" 2>/dev/null
  cp "$RUNS/$name/best/train_config.json" "$W/train_config_$name.json" 2>/dev/null
}

eval_one() {  # name heads-dir
  local name=$1 heads=$2
  timeout "${EMAX:-240}" $M heads-accuracy --heads "$heads" --prompts "$PROMPTS" --limit 20 --max-new-tokens ${ACC_NEW:-128} \
    --out "$W/acc_$name.json" > /dev/null 2>&1
  for tree in ${TREES:-dynamic64 tree64}; do
    timeout "${EMAX:-240}" $M bench --heads "$heads" --tree "$tree" --prompts "$PROMPTS" --limit 20 \
      --max-new-tokens ${NEW:-256} --out "$W/bench_${name}_$tree/report.json" 2>&1 | tail -4 > "$W/bench_${name}_$tree.txt"
  done
}

queue() {  # gpu  "name|flags" lines  (runs the function $FN on each)
  local gpu=$1; shift
  while IFS='|' read -r name flags; do
    [ -n "$name" ] || continue
    CUDA_VISIBLE_DEVICES=$gpu $FN "$name" $flags
  done <<< "$1"
}

split_lines() {  # lines, k, n: every n-th line from the k-th
  echo "$1" | grep -v '^$' | awk -v k="$2" -v n="$3" 'NR % n == k'
}

case "$1" in
  train)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/card.txt"
    FN=train_one
    for q in $(seq 0 $((NQ - 1))); do queue $((q % NGPU)) "$(split_lines "$RECIPES" $(( (q + 1) % NQ )) "$NQ")" & done
    wait
    tail -n 2 "$W"/train_*.txt
    tar czf "$OUT/train.tgz" -C "$W" .
    ;;
  eval)
    lines=""; [ "${SHIPPED:-1}" = 1 ] && lines="shipped|medusa_llama/assets/heads/smollm2-135m-instruct"  # SHIPPED=0: runs only
    for d in "$RUNS"/*/best; do [ -d "$d" ] && lines="$lines
$(basename "$(dirname "$d")")|$d"; done
    lines="$lines
${EXTRA:-}"  # EXTRA: more "name|heads-dir" lines (e.g. a run's heads with another draft vocabulary)
    FN=eval_one
    for q in $(seq 0 $((NQ - 1))); do queue $((q % NGPU)) "$(split_lines "$lines" $(( (q + 1) % NQ )) "$NQ")" & done
    wait
    python3 - "$W" <<'EOF' | tee "$W/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| heads | tree | tokens/step | speedup | Medusa tok/s | vanilla tok/s | identical | head-1 top-1 (decoder) |")
print("|---|---|---|---|---|---|---|---|")
for rep in sorted(out.glob("bench_*/report.json")):
    name, tree = rep.parent.name[len("bench_"):].rsplit("_", 1)
    r = json.loads(rep.read_text())
    acc = out / f"acc_{name}.json"
    top1 = json.loads(acc.read_text())["accuracy"][0][0] if acc.exists() else float("nan")
    print(f"| {name} | {tree} | {r['mean_accepted_tokens']:.3f} | {r['speedup']:.2f}x "
          f"| {r['medusa_tokens_per_s']:.0f} | {r['baseline_tokens_per_s']:.0f} | {r['identical']} | {top1:.3f} |")
EOF
    tar czf "$OUT/eval.tgz" -C "$W" --exclude "train_*" --exclude "log_*" --exclude "*.png" .
    ;;
  ddp)  # one recipe through `accelerate launch`: DDP_STEPS1 steps on one GPU (tokens/s), then the whole run on NPROC
    # GPUs into $RUNS/ddp (resumed when a call's limit stopped it). DDP_FLAGS: the recipe; --batch-size is per process.
    export NCCL_NVLS_ENABLE=0  # NVLink multicast off (the device's KINDS.md)
    for n in 1 ${NPROC:-2}; do
      steps=$STEPS dir="$RUNS/ddp"; [ $n = 1 ] && steps=${DDP_STEPS1:-200} dir="$RUNS-1gpu/ddp1"
      grep -qs '"event": "done"' "$dir/log.jsonl" && continue
      resume=""; [ -d "$dir/last" ] && resume=--resume
      /usr/bin/time -f "ddp on $n GPU(s) wall %e s" timeout "${TMAX:-540}" accelerate launch --num_processes $n \
        $([ $n -gt 1 ] && echo --multi_gpu) --mixed_precision no -m medusa_llama train --data "$DATA" --batch-size ${BS:-16} \
        --max-steps "$steps" --eval-every "${EVERY:-500}" --save-every "${EVERY:-500}" --save-dir "$dir" $resume \
        ${DDP_FLAGS:-} 2>&1 | tr '\r' '\n' | grep -v "step/s\]$" | tail -5 | tee -a "$OUT/ddp$n.txt"
      cp "$dir/log.jsonl" "$OUT/log_ddp$n.jsonl" 2>/dev/null
      cp "$dir/best/train_config.json" "$OUT/train_config_ddp$n.json" 2>/dev/null
    done
    ;;
  pack)  # NAME...: a run's best heads in bf16 (transport only: the repo re-saves them with `medusa-llama export`)
    shift
    for name in "$@"; do
      rm -rf "$W/pack_$name" && mkdir -p "$W/pack_$name"
      python3 -c "import sys, torch; from medusa_llama.decode.heads import MedusaHeads
MedusaHeads.load(sys.argv[1]).save(sys.argv[2], torch.bfloat16)" "$RUNS/$name/best" "$W/pack_$name" || continue
      cp "$RUNS/$name/best/train_config.json" "$RUNS/$name/best/log.jsonl" "$RUNS/$name/best/curves.png" "$W/pack_$name/"
      tar czf "$OUT/heads_$name.tgz" -C "$W" "pack_$name"
    done
    ls -la "$OUT"
    ;;
esac
