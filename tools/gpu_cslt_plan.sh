#!/usr/bin/env bash
# GPU host: the plan-caching cuSPARSELt path against torch's binding (bit-exactness, CUDA-graph
# replay), then the whole linear's host and GPU time per call with each (tools/gpu_diag_linear.py).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-out/cslt_plan}
mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cslt_plan.py 2>&1 | tail -n 15 | tee "$OUT/test_cslt_plan.log"
for impl in torch plan; do
  SLIDESPARSE_CSLT_IMPL=$impl timeout 90 python3 tools/gpu_diag_linear.py "$OUT/diag_$impl.json" 2>&1 | grep -v Warn | sed "s/^/$impl: /"
done
