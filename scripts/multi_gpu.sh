#!/usr/bin/env bash
# Data-parallel check and throughput on a multi-GPU host (run from the repository root, with a
# CUDA build of sympow as $SYMPOW). 1) the tiny preset on 1 GPU (grad_accum 2) and on 2 GPUs
# (one micro-batch each) must give the same loss curve (SKIP_CURVE=1 skips it); 2) gpt2-124m
# tokens/s at each of $CONTEXTS (default "4096 16384") on 1 and 2 GPUs. NCCL comes from PyTorch's nvidia-nccl wheel when the system has none.
set -euo pipefail
SYMPOW=${SYMPOW:-./.carry/sympow}
OUT=${OUT:-/tmp/mgpu}
if ! ldconfig -p | grep -q 'libnccl.so '; then
    lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')
    mkdir -p /tmp/nccl && ln -sf "$lib"/libnccl.so.2 /tmp/nccl/libnccl.so
    export LD_LIBRARY_PATH=/tmp/nccl:$lib:${LD_LIBRARY_PATH:-}
fi
rm -rf "$OUT" && mkdir -p "$OUT"
CONTEXTS=${CONTEXTS:-"4096 16384"}
if [ -z "${SKIP_CURVE:-}" ]; then
common=(--no-progress --set train.grad_accum=2 --set train.eval_every=10 --steps 40)
$SYMPOW train --gpus 1 --out "$OUT/one" "${common[@]}" | tail -1
$SYMPOW train --gpus 2 --out "$OUT/two" "${common[@]}" | tail -1
python3 - "$OUT" <<'PY'
import json, sys
def curve(d):
    out = {}
    for l in open(f"{sys.argv[1]}/{d}/metrics.jsonl"):
        v = json.loads(l)
        for k in ("loss", "val_loss"):
            if k in v: out[(v["step"], k)] = v[k]
    return out
a, b = curve("one"), curve("two")
assert a.keys() == b.keys(), "different metric lines"
worst = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
print(f"1 GPU vs 2 GPUs, same global batch: {len(a)} losses, max relative difference {worst:.2e}")
PY
fi
for ctx in $CONTEXTS; do
  for g in 1 2; do
    echo "== gpt2-124m, context $ctx, batch 1 × grad_accum 2, $g GPU(s)"
    $SYMPOW train --preset gpt2-124m --gpus $g --out "$OUT/big$ctx-$g" --no-progress --steps 6 \
        --set data.context=$ctx --set train.batch_size=1 --set train.grad_accum=2 --set train.eval_every=0 \
        --set train.eval_batches=1 --set train.checkpoint_every=0 | tail -2 | head -1
  done
done
