#!/usr/bin/env bash
# sympow's fused attention kernels and their peers, in one call on one GPU, one combined table.
#
# On the GPU machine, from the repository root, with the release binary (built with
# `--features sympow-cli/cuda`) at $SYMPOW (default .carry/sympow) and the peers' wheels in .whl/
# (retention, fla-core, einops: scripts/peers_env.sh has the pip download line):
#   bash scripts/bench_attention.sh [T list, default 1024,4096,16384,65536]
# On a fresh machine the peers' Triton autotuning takes most of the call (the peers are cut
# after PEERS_TIMEOUT seconds); carry the $OUT/triton-autotune.tgz it leaves back as
# .triton-autotune.tgz and the next call runs every peer (scripts/peers_env.sh).
set -euo pipefail
T=${1:-1024,4096,16384,65536}
SYMPOW=${SYMPOW:-.carry/sympow}
OUT=${OUT:-$(mktemp -d)}
source "$(dirname "$0")/peers_env.sh"
peers_setup
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
"$SYMPOW" bench attention --time "$T" --reps "${REPS:-10}" --naive-max-t 1024 --json "$OUT/sympow.jsonl" --stages
status=0
timeout "${PEERS_TIMEOUT:-480}" python3 bench/peers.py --T "$T" --reps "${REPS:-10}" --sympow-json "$OUT/sympow.jsonl" \
  || status=$?
peers_save
exit $status
