#!/usr/bin/env bash
# Here (with network): fetch cuSPARSELt 0.10.0's library and cut it into parts a device call can
# carry (docs/gpu-host.md). Writes .cslt010/part* and sums.txt (git-ignored).
#   bash tools/build_cslt_parts.sh [VERSION]
set -euo pipefail
ver=${1:-0.10.0}
out=.cslt010; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$tmp" "nvidia-cusparselt-cu13==$ver"
(cd "$tmp" && unzip -q -o ./*.whl 'nvidia/*/lib/libcusparseLt.so.0')
lib=$(find "$tmp" -name libcusparseLt.so.0 | head -1)
rm -rf "$out"; mkdir -p "$out"
xz -T0 -6 -c "$lib" | split -b 48M -d - "$out/part"
(cd "$out" && sha256sum part* > sums.txt)
ls -la "$out"
