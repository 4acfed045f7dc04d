#!/usr/bin/env bash
# Issue 9, two experiments in one device call (about 8.5 minutes on one H200), run from the repo root:
#   bash scripts/gpu_issue9.sh            (results: $OUT/issue9.tgz and $OUT/summary.md)
# A. Medusa-2 without drift: the shipped heads frozen (--head-lr-mult 0), a LoRA adapter (r 8 on every projection,
#    9.8 MB in fp32: with the 12.6 MB of heads under 25 MB) alone learns from their loss and the LM KL x10 (the CPU's
#    r2 recipe let the heads learn: they lost accuracy). a_qlora: on a 4-bit NF4 base (--qlora, the teacher is that
#    4-bit model); a_lora (A_LORA=1, the default): the same on the bf16 base, since decoding merges the adapter into
#    the unquantized model, whose hidden states the heads were trained on. Measured by benchmarks/medusa2_quality.py
#    (targets: agreement >= 98%, val ppl within 2%), heads-accuracy and bench (the shipped heads, no adapter, are
#    the baseline).
# B. Own LM heads, one change at a time: two runs continue the shipped heads with the shipped recipe (soft targets,
#    prefix attention + token input, lr 5e-4, heads x4, batch 16; B_STEPS steps, not the shipped 2400, to fit the
#    call), one with --lm-head own (each own LM head starts as the base one), one with the shared head (control).
# Chains run side by side on the one GPU (a small model's step is host-bound): train -> [quality ->] heads-accuracy
# for each run (the shipped heads' accuracy after b_shared's). Then the benches run one at a time (their tokens/s
# need the GPU alone), all tree64 with the shipped draft vocabulary (copied beside each run's heads).
# Every stage runs under `timeout`, capped by the call's deadlines (T_CHAINS, T_END: seconds from the start).
# CPU dry run (every stage, tiny): SETUP=0 A_STEPS=2 B_STEPS=2 BS=1 EVAL_BATCHES=1 LIMIT=2 NEW=8 ACC_NEW=8 \
#   Q_PROMPTS=2 Q_NEW=8 Q_VAL=1 OUT=/tmp/dry/out W=/tmp/dry/w RUNS=/tmp/dry/runs T_CHAINS=3000 T_END=4000 \
#   TMAX_A=1500 TMAX_B=1500 EMAX=600 BMAX=600 bash scripts/gpu_issue9.sh
set -o pipefail
[ "${SETUP:-1}" = 0 ] || source scripts/device_setup.sh  # SETUP=0: a CPU dry run, as in gpu_heads.sh
START=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=${W:-/tmp/w_issue9}; mkdir -p "$W"
RUNS=${RUNS:-/tmp/runs9}
DATA=${DATA:-/tmp/data/sd-all}
PROMPTS=${PROMPTS:-.prompts/heldout20.jsonl}
SHIPPED=medusa_llama/assets/heads/smollm2-135m-instruct
M="python3 -m medusa_llama"
A_STEPS=${A_STEPS:-180}
B_STEPS=${B_STEPS:-500}
BS=${BS:-16}
T_CHAINS=${T_CHAINS:-330}  # the chains end by then (s since the start); the benches by T_END
T_END=${T_END:-505}
A_FLAGS=${A_FLAGS:-"--lora-r 8 --lora-alpha 16 --lr 5e-5 --head-lr-mult 0 --lm-loss-weight 10 --warmup-steps 20"}
RECIPE="--prefix-attention --prefix-token-input --soft-targets"  # the shipped heads' architecture and targets
B_FLAGS=${B_FLAGS:-"--lr 5e-4 --head-lr-mult 4 --warmup-steps 50"}  # the shipped recipe's

if [ ! -f "$DATA/meta.json" ] && [ -f .sdall/sd_all.tgz ]; then
  mkdir -p "$(dirname "$DATA")" && tar xzf .sdall/sd_all.tgz -C "$(dirname "$DATA")"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/card.txt" 2>/dev/null
python3 -c "from medusa_llama.loading import converted_embedded; converted_embedded()"  # the GGUF, converted once
echo "setup done at $(( $(date +%s) - START )) s" | tee "$W/times.txt"

left() {  # MAX DEADLINE: seconds a stage may take, at most MAX and not past DEADLINE (seconds since the start)
  local rest=$(( $2 - ($(date +%s) - START) ))
  [ "$rest" -lt "$1" ] && echo $(( rest > 1 ? rest : 1 )) || echo "$1"
}

stage() {  # NAME MAX DEADLINE command...: one timed stage, its output's tail in $W/NAME.txt
  local name=$1 max=$2 deadline=$3; shift 3
  local t0; t0=$(date +%s)
  timeout "$(left "$max" "$deadline")" "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|step/s\]$\|prompt/s\]$" \
    | tail -"${TAIL:-6}" > "$W/$name.txt"
  local rc=${PIPESTATUS[0]}  # the stage's own status (124: timed out)
  echo "$name: rc $rc, $(( $(date +%s) - t0 )) s (ended at $(( $(date +%s) - START )) s)" | tee -a "$W/times.txt"
}

train_run() {  # NAME STEPS MAX flags...: one training run into $RUNS/NAME, evaluated twice, saved at the end
  local name=$1 steps=$2 max=$3; shift 3
  if [ -e "$RUNS/$name" ]; then  # never deleted here: it may hold a run worth keeping
    echo "train_$name: $RUNS/$name exists, not trained again (set RUNS to a new directory)" | tee -a "$W/times.txt"
    return
  fi
  stage "train_$name" "$max" "$T_CHAINS" $M train --data "$DATA" --init-heads "$SHIPPED" $RECIPE --batch-size "$BS" \
    --max-steps "$steps" --eval-every $(( (steps + 1) / 2 )) --eval-batches "${EVAL_BATCHES:-50}" --save-every "$steps" \
    --log-every 10 --save-dir "$RUNS/$name" "$@"
  cp "$RUNS/$name/log.jsonl" "$W/log_$name.jsonl" 2>/dev/null
  cp "$RUNS/$name/best/train_config.json" "$W/train_config_$name.json" 2>/dev/null
  # the shipped draft vocabulary beside the run's heads: bench and heads-accuracy then propose as for the shipped
  [ -d "$RUNS/$name/best" ] && cp "$SHIPPED/draft_vocab.safetensors" "$RUNS/$name/best/"
  du -sh "$RUNS/$name/best"/* 2>/dev/null > "$W/size_$name.txt"
}

accuracy() {  # NAME HEADS-DIR (an adapter/ beside the heads is merged)
  [ -f "$2/medusa_heads.safetensors" ] || return
  stage "acc_$1" "${EMAX:-100}" "$T_CHAINS" $M heads-accuracy --heads "$2" --prompts "$PROMPTS" \
    --limit "${LIMIT:-20}" --max-new-tokens "${ACC_NEW:-128}" --out "$W/acc_$1.json"
}

chain_a() {  # NAME flags...: a Medusa-2 run, its quality and heads-accuracy (the adapter merged)
  # its quality reads the built-in held-out prompts (the sharegpt wheel, .whlsg, must travel) or Q_PROMPT_FILE
  local name=$1; shift
  train_run "$name" "$A_STEPS" "${TMAX_A:-210}" --stage medusa2 $A_FLAGS "$@"
  if [ -f "$RUNS/$name/best/adapter_config.json" ]; then
    TAIL=2 stage "quality_$name" "${EMAX:-100}" "$T_CHAINS" python3 benchmarks/medusa2_quality.py \
      --data "$DATA" --adapter "$RUNS/$name/best" --prompts "${Q_PROMPTS:-40}" \
      --new-tokens "${Q_NEW:-128}" --val-batches "${Q_VAL:-40}" ${Q_PROMPT_FILE:+--prompt-file "$Q_PROMPT_FILE"}
  fi
  accuracy "$name" "$RUNS/$name/best"
}

chain_b() {  # NAME LM-HEAD
  train_run "$1" "$B_STEPS" "${TMAX_B:-210}" --stage medusa1 --lm-head "$2" $B_FLAGS
  accuracy "$1" "$RUNS/$1/best"
}

[ "${QLORA:-1}" = 1 ] && chain_a a_qlora --qlora &
[ "${A_LORA:-1}" = 1 ] && chain_a a_lora &
chain_b b_own own &
{ chain_b b_shared shared; accuracy shipped "$SHIPPED"; } &
wait

bench() {  # NAME HEADS-DIR
  [ -f "$2/medusa_heads.safetensors" ] || return
  TAIL=3 stage "bench_$1" "${BMAX:-90}" "$T_END" $M bench --heads "$2" --tree tree64 --prompts "$PROMPTS" \
    --limit "${LIMIT:-20}" --max-new-tokens "${NEW:-256}" --out "$W/bench_$1/report.json"
}
bench shipped "$SHIPPED"  # in order of need: the baseline, the issue's three runs, then the bf16-LoRA variant
bench a_qlora "$RUNS/a_qlora/best"
bench b_own "$RUNS/b_own/best"
bench b_shared "$RUNS/b_shared/best"
bench a_lora "$RUNS/a_lora/best"

python3 - "$W" <<'EOF' | tee "$W/summary.md"
import json, pathlib, sys
w = pathlib.Path(sys.argv[1])
def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
print("| heads | tokens/step | speedup | Medusa tok/s | vanilla tok/s | identical | top-1 h1..h4 (decoder) | val top-1 (trainer) |")
print("|---|---|---|---|---|---|---|---|")
for name in ("a_qlora", "a_lora", "b_own", "b_shared", "shipped"):
    r, acc = load(w / f"bench_{name}" / "report.json"), load(w / f"acc_{name}.json")
    top1 = " ".join(f"{a[0]:.3f}" for a in acc["accuracy"]) if acc else "-"
    evals = [json.loads(line) for line in (w / f"log_{name}.jsonl").read_text().splitlines()] \
        if (w / f"log_{name}.jsonl").exists() else []
    evals = [e for e in evals if e.get("event") == "eval"]
    val = " ".join(f"{a:.3f}" for a in evals[-1]["top1"]) + f" (step {evals[-1]['step']})" if evals else "-"
    if r:
        print(f"| {name} | {r['mean_accepted_tokens']:.3f} | {r['speedup']:.2f}x | {r['medusa_tokens_per_s']:.0f} "
              f"| {r['baseline_tokens_per_s']:.0f} | {r['identical']} | {top1} | {val} |")
    else:
        print(f"| {name} | - | - | - | - | - | {top1} | {val} |")
for name in ("a_qlora", "a_lora"):
    q = w / f"quality_{name}.txt"
    lines = [line for line in q.read_text().splitlines() if line.startswith("{")] if q.exists() else []
    if lines:
        r = json.loads(lines[-1])
        ppl = r["val_ppl_adapted"] / r["val_ppl_original"] - 1
        print(f"\n{name} quality: greedy agreement {r['greedy_token_agreement']:.4f} (target >= 0.98), identical "
              f"{r['identical_continuations']}, val ppl {r['val_ppl_original']:.4f} -> {r['val_ppl_adapted']:.4f} "
              f"({ppl:+.2%}, target within 2%)")
EOF
cat "$W/times.txt"
cp "$W/summary.md" "$OUT/summary.md"
tar czf "$OUT/issue9.tgz" -C "$W" --exclude "*.png" .
echo "total $(( $(date +%s) - START )) s"; ls -la "$OUT"
