#!/usr/bin/env bash
# A/B of sympow builds on the GPU machine, in one call: each binary's device check, then the
# fused attention and the gpt2-124m training step of every binary, interleaved and repeated so
# that drift between runs shows. Builds come from scripts/build_for_device.sh.
#   bash scripts/ab_device.sh .carry/base .carry/new [...]
# Environment: ROUNDS (2), CHECK (1: run device-check first, each under a timeout), ATTN (1),
# TRAIN (1), TRAIN_ARGS (the bench train arguments), SEED (7), STAGES (0; 1: each binary's
# fused attention at T = 4k by stage, synchronised, after the rounds).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BINARY [BINARY...]" >&2; exit 2; }
ROUNDS=${ROUNDS:-2}
TRAIN_ARGS=${TRAIN_ARGS:---preset gpt2-124m --variants conformal,sympow-gated --context 16384 --tokens 16384 --reps 3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
status=0
if [ "${CHECK:-1}" = 1 ]; then
  for b in "$@"; do
    log=$(mktemp)
    timeout 300 "$b" device-check --seed "${SEED:-7}" > "$log" 2>&1
    rc=$?
    echo "$b device-check: rc=$rc $(tail -1 "$log")"
    grep -iE "fail|mismatch|panic|error" "$log" | grep -v " 0 failed" | head -5
    [ $rc -eq 0 ] || status=1
  done
fi
for round in $(seq "$ROUNDS"); do
  for b in "$@"; do
    if [ "${ATTN:-1}" = 1 ]; then
      echo "== round $round $b: attention"
      "$b" bench attention --time 4096,65536 --naive-max-t 0 --reps 5 2>&1 | grep fused
    fi
    if [ "${TRAIN:-1}" = 1 ]; then
      echo "== round $round $b: train"
      # shellcheck disable=SC2086
      "$b" bench train $TRAIN_ARGS 2>&1 | grep -E "^ [a-z]"
    fi
  done
done
if [ "${STAGES:-0}" = 1 ]; then
  for b in "$@"; do
    echo "== $b: attention stages"
    "$b" bench attention --time 4096 --naive-max-t 0 --reps 5 --stages 2>&1 | sed -n '/in stages/,$p'
  done
fi
exit $status
