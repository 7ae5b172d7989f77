#!/usr/bin/env bash
# Whole-model training throughput: sympow (`sympow bench train`, gpt2-124m preset) against the same
# GPT in PyTorch (bf16 autocast; SDPA for softmax, Manifest's `retention` for sympow), in one call
# on one GPU, one combined table.
#
# On the GPU machine, from the repository root, with the release binary (built with
# `--features sympow-cli/cuda`) at $SYMPOW (default .carry/sympow) and the retention wheel in .whl/
# (the pip download line and the Triton autotuning results: scripts/peers_env.sh):
#   CONTEXT=4096,16384 TOKENS=16384 bash scripts/bench_train.sh [--compile]
set -euo pipefail
CONTEXT=${CONTEXT:-4096,16384}
TOKENS=${TOKENS:-16384}
SYMPOW=${SYMPOW:-.carry/sympow}
OUT=${OUT:-$(mktemp -d)}
source "$(dirname "$0")/peers_env.sh"
peers_setup
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$SYMPOW" bench train --preset gpt2-124m --variants softmax,sympow-gated,conformal \
  --context "$CONTEXT" --tokens "$TOKENS" --reps "${REPS:-3}" --json "$OUT/sympow_train.jsonl"
status=0
python3 bench/train_peers.py --context "$CONTEXT" --tokens "$TOKENS" --reps "${REPS:-3}" \
  --sympow-json "$OUT/sympow_train.jsonl" "$@" || status=$?
peers_save
exit $status
