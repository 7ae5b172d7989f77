#!/usr/bin/env bash
# sympow's fused attention kernels and their peers, in one call on one GPU, one combined table.
#
# On the GPU machine, from the repository root, with the release binary (built with
# `--features sympow-cli/cuda`) at $SYMPOW (default .carry/sympow) and the peers' wheels in .whl/
# (retention, fla-core, einops: see docs/PERFORMANCE.md for the pip download line):
#   bash scripts/bench_attention.sh [T list, default 1024,4096,16384,65536]
#
# Tuning the Triton peers (retention, fla) takes most of a 10-minute call on a fresh machine, so
# the script saves their autotuning results to $OUT/triton-autotune.tgz and, given that file as
# .triton-autotune.tgz in the repository root, starts from them: the next call compiles only
# the chosen configurations and the whole table fits in one call. The peers' timings are the
# same either way (the same configurations win); only the waiting goes.
set -euo pipefail
T=${1:-1024,4096,16384,65536}
SYMPOW=${SYMPOW:-.carry/sympow}
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .triton-autotune.tgz ]; then
  tar xzf .triton-autotune.tgz -C "$TRITON_CACHE_DIR"
  echo "Triton autotuning results: $(tar tzf .triton-autotune.tgz | grep -c autotune.json) from .triton-autotune.tgz"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
"$SYMPOW" bench attention --time "$T" --reps "${REPS:-10}" --naive-max-t 1024 --json "$OUT/sympow.jsonl" --stages
status=0
timeout "${PEERS_TIMEOUT:-480}" python3 bench/peers.py --T "$T" --reps "${REPS:-10}" --sympow-json "$OUT/sympow.jsonl" \
  || status=$?
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/triton-autotune.tgz" -T -)
echo "saved $(tar tzf "$OUT/triton-autotune.tgz" | wc -l) Triton autotuning results to $OUT/triton-autotune.tgz"
exit $status
