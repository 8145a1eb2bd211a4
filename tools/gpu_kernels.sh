#!/usr/bin/env bash
# One device call: environment, cuSPARSELt probe, GPU tests, kernel benchmark (docs/gpu-host.md).
#   STAGE=all|probe|tests|tune|bench (or a list: STAGE='tests tune bench')  BENCH_ARGS="..." bash tools/gpu_kernels.sh
# Writes under ${OUT:-out/gpu}: probe.json, pytest.log, junit.xml, bench/kernel_bench.{csv,json,md,png}
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}; mkdir -p "$OUT/bench"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
STAGE=${STAGE:-all}
nvidia-smi -L; python3 -c 'import torch,triton;print(torch.__version__, triton.__version__, torch.backends.cusparselt.version())'
if [[ $STAGE == all || $STAGE == *probe* ]]; then
  timeout 120 python3 tools/gpu_probe.py 2>&1 | tee "$OUT/probe.log"
fi
if [[ $STAGE == all || $STAGE == *tests* ]]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -40
fi
if [[ $STAGE == all || $STAGE == *tune* ]] && [[ -d ${TUNE_CKPT:-out/tiny_ckpt} ]]; then
  # `slidesparse tune` on a small converted checkpoint (make it with make-model + convert; docs/gpu-host.md)
  rm -f "${TUNE_CKPT:-out/tiny_ckpt}/slidesparse_tuning.json"
  timeout 120 python3 -m slidesparse.tune.cli "${TUNE_CKPT:-out/tiny_ckpt}" --m 16,256,4096 2>&1 | tail -3
  cp "${TUNE_CKPT:-out/tiny_ckpt}/slidesparse_tuning.json" "$OUT/tuning_tiny.json" && head -c 1500 "$OUT/tuning_tiny.json"
fi
if [[ $STAGE == all || $STAGE == *bench* ]]; then
  timeout -s INT -k 20 ${BENCH_TIMEOUT:-400} python3 -m slidesparse.bench.cli kernel --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -5
  cat "$OUT/bench/kernel_bench.md" 2>/dev/null | head -60
fi
