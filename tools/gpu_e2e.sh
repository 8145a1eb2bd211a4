#!/usr/bin/env bash
# End-to-end vLLM benchmark on the GPU host (stock vLLM from the offline bundle; docs/gpu-host.md).
# Usage (after the bundle is installed, /tmp/site/env.sh exists):
#   bash tools/gpu_e2e.sh PRESET OUTDIR WORKLOAD[,WORKLOAD] VARIANT...   (WORKLOAD: prefill | decode)
#   VARIANT: bf16 | fp8-online (vLLM --quantization fp8) | fp8 | int8 (dense W8A8, compressed-tensors,
#            the same per-channel/per-token scheme) | 2_4-fp8 | 2_8-fp8 | 2_8-int8 | ...  (first = baseline)
# SlideSparse checkpoints are tuned (slidesparse tune) right after conversion, as a user would.
# Models are random-weight, real-shape (slidesparse make-model); weights do not change speed.
# One `vllm bench throughput` process per variant and workload. For every M in one engine per
# variant (the prefill/decode matrix, resumable), use tools/gpu_e2e_matrix.sh.
set -euo pipefail
preset=$1 out=$2 workload=$3; shift 3
source /tmp/site/env.sh
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps --no-build-isolation -e .
m=/root/models/$preset
slidesparse() { python3 -m slidesparse.cli "$@"; }
[ -f "$m/config.json" ] || slidesparse make-model --preset "$preset" --out "$m"
args=()
for v in "$@"; do
  case $v in
    bf16) args+=("bf16=$m");;
    fp8-online) args+=("fp8 (vLLM --quantization fp8)=$m::--quantization fp8");;
    fp8|int8) d=/root/models/$preset-w8a8-$v
          [ -f "$d/config.json" ] || slidesparse convert "$m" "$d" --sparsity none --format compressed-tensors --dtype "$v"
          args+=("$v dense W8A8=$d");;
    *-*) sp=${v%-*} dt=${v#*-}; d=/root/models/$preset-SlideSparse-$sp-$dt
          [ -f "$d/config.json" ] || { slidesparse convert "$m" "$d" --sparsity "$sp" --dtype "$dt" \
                                      && slidesparse tune "$d"; }
          args+=("$sp $dt=$d");;
  esac
done
vv=(); for a in "${args[@]}"; do vv+=(--variant "$a"); done
for w in ${workload//,/ }; do vv+=(--workload "$w"); done
PYTHONUNBUFFERED=1 python3 -m slidesparse.bench.e2e_cli --out "$out" --title "$preset" "${vv[@]}"
