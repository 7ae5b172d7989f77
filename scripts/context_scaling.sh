#!/usr/bin/env bash
# The context-scaling experiment (docs/RESULTS.md) on a GPU machine, one training context per
# invocation so that each fits one time-limited device call; every run's files except its
# checkpoint (config, metrics, loss plot, evaluation CSV) go into one archive,
# $OUT/context-scaling-ctx<C>.tar.gz (the device tool returns few files). Unpack the archives
# into runs/context-scaling/ and assemble the table and figure, anywhere, with
# `sympow experiment context-scaling --report-only` (same flags).
#
#   CTX=1024 STEPS=150 OUT=/tmp/out bash scripts/context_scaling.sh
# (WARMUP and EVAL_EVERY set train.warmup_steps and train.eval_every: 30 and 40 by default; SEED
# sets train.seed, the config's 1337 by default — runs of another seed belong in RUNS of their
# own, e.g. RUNS=runs/context-scaling-seed2. SET adds one more config override to every run, e.g.
# SET=model.rotary_param=per-frequency, in RUNS of its own too.)
set -euo pipefail
B=${SYMPOW:-.carry/sympow}
DATA=${DATA:-/tmp/linux}
RUNS=${RUNS:-runs/context-scaling}
if [ ! -d "$DATA" ]; then
  "$B" data prepare "${TARBALL:-.carry/linux-6.12-long.tar.xz}" --out "$DATA" --max-deflate-ratio 4 | head -2
fi
"$B" experiment context-scaling --preset small --set data.corpus="$DATA" \
  --contexts "${CTX:?set CTX}" --steps "${STEPS:-150}" --tokens-per-step 32768 \
  --variants "${VARIANTS:-softmax,sympow-p2,sympow-gated,conformal}" \
  --set train.warmup_steps="${WARMUP:-30}" --set train.eval_every="${EVAL_EVERY:-40}" --set train.eval_batches=2 \
  ${SEED:+--set train.seed="$SEED"} ${SET:+--set "$SET"} \
  --eval-windows "${EVAL_WINDOWS:-32}" --out "$RUNS" --no-progress
if [ -n "${OUT:-}" ]; then
  names=${VARIANTS:-all}  # (commas and '=' are not names the device tool returns)
  set_name=${SET//[^A-Za-z0-9._-]/_}
  tar -C "$RUNS" --exclude='checkpoint*' -czf "$OUT/context-scaling-ctx$CTX-${names//,/_}${SEED:+-seed$SEED}${SET:+-$set_name}.tar.gz" .
fi
