#!/usr/bin/env bash
# A long-document subset of the Linux 6.12 source tree (Debian's linux-source-6.12), small
# enough to carry to a GPU machine: the source and documentation files of at least 64 KiB
# (≈ 30 k GPT-2 tokens each), less the generated AMD GPU register headers, as one .tar.xz.
# docs/DATA.md measures it; `sympow data prepare` reads the result directly.
#
#   apt-get install linux-source-6.12
#   bash scripts/linux_long_files.sh [SRC.tar.xz] [OUT.tar.xz] [EXCLUDE_REGEX]
set -euo pipefail
src=${1:-/usr/src/linux-source-6.12.tar.xz}
out=${2:-linux-6.12-long.tar.xz}
exclude=${3:-drivers/gpu/}
list=$(mktemp)
trap 'rm -f "$list"' EXIT
xz -dc "$src" | tar -tvf - \
  | awk -v ex="$exclude" '$1 ~ /^-/ && $3 >= 65536 && $6 ~ /\.(c|h|S|rs|py|sh|pl|rst|txt|md)$/ && $6 !~ ex {print $6}' \
  | sort > "$list"
echo "$(wc -l < "$list") files" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$list"' EXIT
xz -dc "$src" | tar -xf - -C "$tmp" --files-from="$list"
tar -C "$tmp" -cf - --files-from="$list" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 | xz -9 -T0 > "$out"
ls -l "$out" >&2
