#!/usr/bin/env bash
# Builds the CUDA release binary of a git revision (a branch, a commit, or the working tree) for
# the GPU machine, stripped, as .carry/NAME (the folder the device tool carries: pass
# carry [".carry"]). Other revisions build in a worktree of their own with a target folder of
# their own, so the working tree and its build stay as they are.
#   bash scripts/build_for_device.sh [REV] NAME      e.g. main base; ws-read ws; (no REV: working tree)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 1 ]; then rev=""; name=$1; elif [ $# -eq 2 ]; then rev=$1; name=$2; else
  echo "usage: $0 [REV] NAME" >&2; exit 2; fi
mkdir -p .carry
if [ -z "$rev" ]; then
  src=.; target=${CARGO_TARGET_DIR:-$(pwd)/target/cuda}
else
  src=$(mktemp -d)/tree
  git worktree add -q --detach "$src" "$rev"
  trap 'git worktree remove --force "$src"' EXIT
  target=$(pwd)/target/cuda-rev
fi
(cd "$src" && CARGO_TARGET_DIR=$target cargo build -q --release --features sympow-cli/cuda)
cp "$target/release/sympow" ".carry/$name"
strip ".carry/$name"
echo ".carry/$name: $(git rev-parse --short "${rev:-HEAD}")${rev:+ ($rev)}$([ -z "$rev" ] && ! git diff --quiet && echo ' + uncommitted changes'), $(du -h ".carry/$name" | cut -f1)"
