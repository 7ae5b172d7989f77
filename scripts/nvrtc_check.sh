#!/usr/bin/env bash
# Compiles every CUDA kernel module with NVRTC on this machine — no GPU or driver needed — so a
# kernel that does not compile shows here, before a call to the GPU machine (where NVRTC errors
# otherwise show first). Fetches NVRTC once (the `nvidia-cuda-nvrtc` wheel from PyPI, ≈ 58 MB)
# into target/nvrtc, then runs the `kernels_compile_with_nvrtc` test with it required.
#   bash scripts/nvrtc_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/nvrtc
lib=$(find "$dir" -name 'libnvrtc.so.*' -not -name '*builtins*' 2>/dev/null | head -1 || true)
if [ -z "$lib" ]; then
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir" "nvidia-cuda-nvrtc==${NVRTC_VERSION:-13.5.37}"
  python3 -c "import glob, zipfile; zipfile.ZipFile(glob.glob('$dir/*.whl')[0]).extractall('$dir')"
  lib=$(find "$dir" -name 'libnvrtc.so.*' -not -name '*builtins*' | head -1)
fi
echo "NVRTC: $lib"
LD_LIBRARY_PATH="$(cd "$(dirname "$lib")" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" SYMPOW_REQUIRE_NVRTC=1 \
  cargo test -q -p sympow-cuda --features cuda --lib kernels_compile_with_nvrtc
