#!/usr/bin/env bash
# On the GPU host: the kernel benchmark with torch's cuSPARSELt 0.8.0, then with 0.10.0 put in its
# place through LD_PRELOAD (same struct sizes and enums), then 0.8.0 again to bound drift.
# The parts from tools/build_cslt_parts.sh must already be in /root/c (sent like the vLLM bundle,
# one part per back-to-back call; docs/gpu-host.md).
#   OUT=... bash tools/gpu_cslt_version.sh [bench args]   (default: --presets qwen2.5-7b --m 4096,16384)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/cslt_version}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
args=${*:---presets qwen2.5-7b --m 4096,16384}
lib=/tmp/cslt010/libcusparseLt.so.0
if [ ! -f $lib ]; then
  (cd /root/c && sha256sum -c --quiet sums.txt)
  mkdir -p /tmp/cslt010 && cat /root/c/part* | xz -d > $lib
fi
for run in a_08 b_010 c_08; do
  pre=; [ $run = b_010 ] && pre=$lib
  LD_PRELOAD=$pre python3 -c 'import torch; print("cuSPARSELt", torch.backends.cusparselt.version())'
  LD_PRELOAD=$pre timeout 280 python3 -m slidesparse.bench.cli kernel --out "$OUT/$run" $args 2>&1 | tail -2
done
for run in a_08 b_010 c_08; do echo "== $run"; sed -n '/## Targets/,/^quant/p' "$OUT/$run/kernel_bench.md"; done
