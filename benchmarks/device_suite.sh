#!/usr/bin/env bash
# One call on a lent accelerator: every measurement the speed and inference work still needs,
# most important first, inside a time budget, so a single <= 9 minute session gets them all.
#
#   1. W1 training step (1B, 4 x 4096 tokens, 24 tiles) in our best configuration, beside the
#      PyTorch reference eager and with torch.compile (benchmarks/train_step.py)
#   2. generation tokens/s, 1B, batch 1 and 16, beside transformers generate (generate.py)
#   3. the attention sweep: ViT / LLM causal / LLM packed, every implementation (attention.py)
#   4. the same training step at the 2B and 4B shapes, beside their references
#
# Every part writes its JSON into benchmarks/results/ (file names carry the card), and into
# $OUT when that is set (the device tool brings $OUT back). A part whose estimate no longer fits
# the remaining budget is skipped and listed as such in suite_<card>_<stamp>_summary.json.
#
# Environment:
#   BUDGET_S=520       seconds for the whole suite (the device call's limit minus slack)
#   PARTS="w1 generate attention 2b 4b"   which parts, in this order
#   REMAT=save_dots    W1's remat policy(ies), comma list (save_dots was the fastest on H100)
#   LOSS_CHUNK=1024    cross-entropy chunk (2048 moves fewer bytes; check peak memory)
#   TORCH_REF=.devrun/torch_reference_step.py   the PyTorch reference training step
#   TINY=1             CPU dry run: tiny model and shapes, no PyTorch reference, results in
#                      .devrun/dryrun/ (--dry-run does the same)
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=${TINY:-0}
[[ "${1:-}" == "--dry-run" ]] && TINY=1
BUDGET_S=${BUDGET_S:-520}
PARTS=${PARTS:-"w1 generate attention 2b 4b"}
REMAT=${REMAT:-save_dots}
LOSS_CHUNK=${LOSS_CHUNK:-1024}
TORCH_REF=${TORCH_REF:-.devrun/torch_reference_step.py}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$TINY" == 1 ]]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  CARD=cpu
else
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
         | tr 'A-Z' 'a-z' | grep -oE 'h100|h200|a100|l4|b200|gh200' | head -1)
  CARD=${CARD:-unknown}
  if [[ ! -f "$TORCH_REF" ]]; then
    echo "missing $TORCH_REF: copy torch_reference_step.py into .devrun/ and carry .devrun" >&2
    exit 2
  fi
fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=benchmarks/results
[[ "$TINY" == 1 ]] && RES=.devrun/dryrun  # dry runs measure nothing worth keeping
mkdir -p "$RES"
PREFIX="$RES/suite_${CARD}_${STAMP}"
START=$(date +%s)
declare -a DONE=() SKIPPED=() FAILED=()

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

publish() {  # copy results to $OUT after every part, so a timeout keeps what finished
  if [[ -n "${OUT:-}" ]]; then cp -f "$PREFIX"_* "$OUT"/ 2>/dev/null || true; fi
}

# part NAME ESTIMATE_S COMMAND...: run COMMAND under the remaining budget if ESTIMATE_S fits.
part() {
  local name=$1 est=$2; shift 2
  local l; l=$(left)
  if (( l < est )); then
    echo "=== skip $name: needs ~${est}s, ${l}s left" | tee -a "$PREFIX"_log.txt
    SKIPPED+=("$name"); return
  fi
  echo "=== $name (budget ${l}s): $*" | tee -a "$PREFIX"_log.txt
  local t0; t0=$(date +%s)
  if timeout "$l" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$PREFIX"_log.txt | grep -vE '^(W|I)[0-9]{4}' \
      | tail -n 30; then
    DONE+=("$name:$(( $(date +%s) - t0 ))s")
  else
    FAILED+=("$name:$(( $(date +%s) - t0 ))s")
  fi
  publish
}

train() {  # train SIZE REMAT TORCH_MODES ITERS
  local size=$1 remat=$2 modes=$3 iters=$4
  if [[ "$TINY" == 1 ]]; then
    "$PY" benchmarks/train_step.py --size tiny --batch 2 --seq 128 --tiles 1 --remat "$remat" \
      --attention auto --torch none --iters 2 --warmup 1 --timeout 600 \
      --json "${PREFIX}_train_${size}.json"
  else
    "$PY" benchmarks/train_step.py --size "$size" --remat "$remat" --attention auto \
      --torch "$modes" --torch-ref "$TORCH_REF" --iters "$iters" --warmup 2 --timeout 300 \
      --loss-chunk "$LOSS_CHUNK" \
      --json "${PREFIX}_train_${size}.json"
  fi
}

export -f train
export TINY PY PREFIX TORCH_REF LOSS_CHUNK

for p in $PARTS; do
  case $p in
    w1) part w1 200 train 1b "$REMAT" compile,eager 5 ;;
    generate)
      if [[ "$TINY" == 1 ]]; then
        part generate 30 "$PY" benchmarks/generate.py --preset tiny-qwen2 --small \
          --batch-sizes 1 2 --repeats 1 --out "${PREFIX}_generate_1b.json"
      else
        part generate 90 "$PY" benchmarks/generate.py --preset mini-internvl-1b \
          --batch-sizes 1 16 --repeats 3 --out "${PREFIX}_generate_1b.json"
      fi ;;
    attention)
      if [[ "$TINY" == 1 ]]; then
        part attention 30 "$PY" benchmarks/attention.py --small --shapes llm_causal \
          --impls xla,ours --iters 1 --warmup 1 --out "${PREFIX}_attention.json"
      else
        part attention 90 "$PY" benchmarks/attention.py --out "${PREFIX}_attention.json"
      fi ;;
    2b|4b) part "$p" 150 train "$p" "$REMAT" compile,eager 3 ;;
    *) echo "unknown part $p (choose from: w1 generate attention 2b 4b)" >&2; exit 2 ;;
  esac
done

"$PY" - "$PREFIX" "$CARD" "$(left)" "${DONE[*]:-}" "${SKIPPED[*]:-}" "${FAILED[*]:-}" <<'EOF'
import json, sys
from mini_internvl_jax.fileio import write_atomic
prefix, card, left, done, skipped, failed = sys.argv[1:]
write_atomic(prefix + "_summary.json", json.dumps({
    "card": card, "seconds_left": int(left), "done": done.split(), "skipped": skipped.split(),
    "failed": failed.split()}, indent=1) + "\n")
EOF
publish
echo "suite on $CARD: done [${DONE[*]:-}] skipped [${SKIPPED[*]:-}] failed [${FAILED[*]:-}]"
(( ${#FAILED[@]} == 0 ))
