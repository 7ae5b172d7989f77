#!/usr/bin/env bash
# sympow's fused attention kernels and their peers, in one call on one GPU, one combined table.
#
# On the GPU machine, from the repository root, with the release binary (built with
# `--features sympow-cli/cuda`) at $SYMPOW (default .carry/sympow) and the peers' wheels in .whl/
# (retention, fla-core, einops, vidrial: see docs/PERFORMANCE.md for the pip download line):
#   bash scripts/bench_attention.sh [T list, default 1024,4096,16384,65536]
set -euo pipefail
T=${1:-1024,4096,16384,65536}
SYMPOW=${SYMPOW:-.carry/sympow}
OUT=${OUT:-$(mktemp -d)}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
"$SYMPOW" bench attention --time "$T" --reps "${REPS:-10}" --naive-max-t 1024 --json "$OUT/sympow.jsonl" --stages
python3 bench/peers.py --T "$T" --reps "${REPS:-10}" --sympow-json "$OUT/sympow.jsonl"
