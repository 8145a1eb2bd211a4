#!/usr/bin/env bash
# The end-to-end matrix on the GPU host: `slidesparse bench e2e --matrix`, one model after another
# (stock vLLM 0.26 from the offline bundle; docs/gpu-host.md, docs/performance.md "End-to-end matrix").
#
#   bash tools/gpu_e2e_matrix.sh PRESET [PRESET ...] [-- EXTRA ARGS for slidesparse bench e2e --matrix]
#   e.g. VARIANTS=fp8,int8,2_8-fp8,2_8-int8 bash tools/gpu_e2e_matrix.sh llama3.2-1b qwen2.5-7b bitnet-b1.58-2b
#   in the background:  setsid nohup bash tools/gpu_e2e_matrix.sh qwen2.5-7b > /root/e2e.log 2>&1 < /dev/null &
#
# Environment: OUT (results folder, default /root/res/e2e_matrix), MODELS (checkpoints, default
# /root/models), VARIANTS (default: bf16, fp8, int8 and 2_4/2_6/2_8/2_10 in fp8 and int8),
# KEEP=1 keeps every checkpoint this run converts (default: each is deleted once its points are done,
# the BF16 base once its model is done: the host has 64 GB of disk, a 7B model is 15 GB in BF16),
# PREPARE_AHEAD=1 converts the next variant while an engine measures (saves the conversion time;
# the report marks the points measured that way).
# Re-running the same command resumes: finished points are skipped (OUT/results.jsonl).
# Progress: tail the log; OUT/e2e_matrix.md is re-written after every (model, variant).
set -uo pipefail
presets=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do presets+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#presets[@]} -gt 0 ] || { echo "usage: bash tools/gpu_e2e_matrix.sh PRESET [PRESET ...] [-- ARGS]" >&2; exit 2; }
source /tmp/site/env.sh
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps --no-build-isolation -e .
out=${OUT:-/root/res/e2e_matrix}
models=${MODELS:-/root/models}
mkdir -p "$out" "$models"
args=(--matrix --out "$out" --ckpt-dir "$models")
[ -n "${VARIANTS:-}" ] && args+=(--variants "$VARIANTS")
[ "${KEEP:-0}" = 1 ] || args+=(--delete-after --delete-base)
[ "${PREPARE_AHEAD:-0}" = 1 ] && args+=(--prepare-ahead)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
df -h "$models" | tail -1
status=0
for p in "${presets[@]}"; do
  echo "== $p: $(date -u +%FT%TZ)"
  PYTHONUNBUFFERED=1 python3 -m slidesparse.cli bench e2e "${args[@]}" --models "$p" "$@"
  rc=$?
  echo "== $p: exit $rc at $(date -u +%FT%TZ)"
  [ $rc -eq 0 ] || status=$rc
  [ $rc -eq 130 ] && break
done
# the short table of everything in the results file so far (every model of every session)
python3 - "$out" <<'EOF'
import sys
from pathlib import Path
from slidesparse.bench import e2e_matrix as mx
out = Path(sys.argv[1])
mx.write_report(out)
print(mx.summary(mx.read_results(out / mx.RESULTS)[0]))
print(f"report: {out / 'e2e_matrix.md'}")
EOF
exit $status
