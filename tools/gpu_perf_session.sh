#!/usr/bin/env bash
# The performance session on the GPU host, as one background run (after the vLLM bundle is
# installed: /tmp/site/env.sh exists; docs/gpu-host.md):
#
#   setsid nohup bash tools/gpu_perf_session.sh > /root/session.out 2>&1 < /dev/null &
#
# Stages (STAGES, default all, in this order): tests (tests/gpu, with vLLM importable so the dense
# buckets and baselines run vLLM's CUTLASS kernel) while the CPU makes the model and converts the
# variants; sparsegpt (a timed `--prune sparsegpt --device cuda` conversion of the preset, alone
# after every other stage, or with SGPT_WHEN=beside next to the tests; its output is deleted);
# tune (every SlideSparse variant in one `slidesparse tune`, the dense timings shared); e2e
# (`slidesparse bench e2e --matrix`: one vLLM engine per variant, prefill and decode points;
# E2E_ARGS adds options, e.g. --fresh-run); crosscheck (stock `vllm bench throughput` of
# CC_VARIANTS, fp8, at prefill CC_PREFILL_M=16384 and decode CC_DECODE_M=256, beside the sweep's points);
# e2e_b (a second matrix in e2e_matrix_b/: each of OBJ_VARIANTS tuned with `--objective prefill`
# on a copy that shares the weights, against the first variant as its baseline in that matrix;
# engine-to-engine variance is NAME#E in VARIANTS); fusion (tools/gpu_fused_lift_bench.py, then prefill
# profiles of FUSION_VARIANT, 2_8-fp8, with every bucket sparse, the lift fusion on and off); profile
# (tools/gpu_profile_vllm.py, prefill and decode traces of PROFILE_VARIANTS);
# hostcost (tools/gpu_host_cost.py: where one layer call's host time goes, three shapes);
# bench (`slidesparse bench kernel`); gemm (tools/gpu_gemm_compare.py: the GEMM with its epilogue
# against vLLM's CUTLASS dense, torch._scaled_mm, cuSPARSELt, torchao's CUTLASS 2:4 kernel when
# .whl/ holds its wheel, and SlideSparse's CUTLASS kernel); gemmclocks (tools/gpu_gemm_clocks.py:
# each kernel sustained with the SM clock and power beside it, CLOCKS_PRESET at CLOCKS_M); ncu
# (tools/gpu_ncu_gemm.py: the same kernels' hardware counters under Nsight Compute); gemm010 (the same problems on
# cuSPARSELt 0.10 through LD_PRELOAD of $CSLT010, waiting up to GEMM010_WAIT s for the file, which
# later device calls assemble from .cslt010/). SGPT_WHEN=first runs the sparsegpt stage alone right
# after the checkpoints are made, before the other GPU stages. Everything lands in $RES (default
# /root/res), each stage in its own log; $RES/session.log says where it is. Re-running skips
# finished work (converted models, tuned tables, finished e2e points).
#
# STAGES=prep (alone) only prepares the checkpoints and runs before vLLM is installed.
# Environment: PRESET (qwen2.5-7b), SGPT_PRESET (the sparsegpt stage's model, PRESET), VARIANTS (fp8,2_8-fp8,2_4-fp8,int8,2_8-int8; NAME#E repeats NAME
# in an engine of its own, e.g. ...,fp8#2,2_8-fp8#2 for engine-to-engine variance), PREFILL_M
# (16384), DECODE_M (256), TUNE_M (slidesparse tune's default buckets when unset), MODELS (/root/models), RES (/root/res),
# BENCH_M (256,16384), BENCH_FORMS (eager,traced,in_op), BENCH_ROUNDS (2), TEST_TIMEOUT (600 s),
# BENCH_TIMEOUT (420 s), PROFILE_M (tokens per profiled prefill step, 16384), PROFILE_DECODE_M (256), TESTS (pytest paths, tests/gpu), GEMM_PRESETS (qwen2.5-7b,llama3.2-1b), GEMM_M
# (64,256,1024,4096,16384), GEMM_LIB_WAIT (0 s), CSLT010 (/root/c/libcusparseLt.so.0), GEMM010_WAIT (0 s);
# SLIDESPARSE_COMMIT names the commit of a copy without git; SLIDESPARSE_CUTLASS_LIB points at the CUTLASS library if it is not in build/csrc/.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${RES:-/root/res}
MODELS=${MODELS:-/root/models}
PRESET=${PRESET:-qwen2.5-7b}
VARIANTS=${VARIANTS:-fp8,2_8-fp8,2_4-fp8,int8,2_8-int8}
STAGES=${STAGES:-tests sparsegpt tune fusion e2e crosscheck e2e_b profile hostcost bench gemm gemm010}
OBJ_VARIANTS=${OBJ_VARIANTS:-2_8-fp8}
PROFILE_VARIANTS=${PROFILE_VARIANTS:-fp8,2_8-fp8}
mkdir -p "$RES" "$MODELS"
# STAGES=prep makes the model and converts the variants only, and needs no vLLM: it can start
# while the bundle is still on its way (a later run with other stages waits for it)
if [ -f /tmp/site/env.sh ]; then source /tmp/site/env.sh
elif [ "$STAGES" != prep ]; then echo "no /tmp/site/env.sh: install the vLLM bundle first (docs/gpu-host.md)"; exit 2; fi
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || python3 -m pip install -q --no-deps --no-build-isolation -e .
ss() { python3 -m slidesparse.cli "$@"; }
say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$RES/session.log"; }
base=$MODELS/$PRESET
SGPT_PRESET=${SGPT_PRESET:-$PRESET}
sgpt_base=$MODELS/$SGPT_PRESET
ckpt() {  # the checkpoint folder of a variant, named as the e2e matrix driver names it (NAME#E: NAME's)
  local v=${1%%#*}
  case $v in fp8|int8) echo "$MODELS/$PRESET-w8a8-$v";; *-*) echo "$MODELS/$PRESET-SlideSparse-${v%-*}-${v#*-}";; esac
}
sparse_ckpts=()
for v in ${VARIANTS//,/ }; do case $v in *#*) ;; 2_*) sparse_ckpts+=("$(ckpt "$v")");; esac; done

say "session: $PRESET [$VARIANTS], stages: $STAGES"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader | tee -a "$RES/session.log"
python3 -c 'import torch, triton, vllm; print("torch", torch.__version__, "triton", triton.__version__, "vllm", vllm.__version__, "cusparselt", torch.backends.cusparselt.version())' 2>/dev/null \
  | tee -a "$RES/session.log" || echo "vllm: not importable (STAGES=prep needs none)" | tee -a "$RES/session.log"

# the model and its variants, on the CPU, while the GPU runs the tests
(
  # one preparation at a time: a run started while another one prepares waits for it, then does
  # what is left (nothing, unless VARIANTS differ)
  lock=$MODELS/.prepare.pid
  if [ -f "$lock" ] && kill -0 "$(cat "$lock")" 2>/dev/null; then
    echo "$(date -u +%T) waiting for the preparation already running (pid $(cat "$lock"))"
    while kill -0 "$(cat "$lock")" 2>/dev/null; do sleep 5; done
  fi
  echo $BASHPID > "$lock"
  if [[ " $STAGES " == *" sparsegpt "* ]] && [ ! -f "$sgpt_base/config.json" ]; then
    ss make-model --preset "$SGPT_PRESET" --out "$sgpt_base" --overwrite
  fi
  [ -f "$base/config.json" ] || ss make-model --preset "$PRESET" --out "$base" --overwrite
  todo=()
  for v in ${VARIANTS//,/ }; do
    [[ $v == *#* ]] && continue   # a repeat engine of another variant's checkpoint
    d=$(ckpt "$v"); [ -f "$d/config.json" ] || [ -z "$d" ] || todo+=("$v")
  done
  # one conversion at a time, each with every core: ten Llama-3.2-1B conversions side by side took
  # 130-180 s each with torch's default threads, and 360-384 s each with the cores split between
  # them (2026-12-02), where one alone takes about 15 s on a 2-core CPU
  for v in "${todo[@]}"; do
    d=$(ckpt "$v")
    case $v in
      fp8|int8) ss convert "$base" "$d" --sparsity none --format compressed-tensors --dtype "$v" --overwrite ;;
      *-*)      ss convert "$base" "$d" --sparsity "${v%-*}" --dtype "${v#*-}" --overwrite ;;
    esac
  done
  wait
) >> "$RES/prepare.log" 2>&1 &   # appended: a second run in the same $RES keeps the first one's log
prep=$!
say "preparing checkpoints in the background (prepare.log)"

sparsegpt_timed() {  # the timed SparseGPT conversion; its output is deleted (random weights: speed only)
  while [ ! -f "$sgpt_base/config.json" ]; do sleep 5; kill -0 $prep 2>/dev/null || break; done
  echo "start $(date -u +%T) ($1; $SGPT_PRESET)"
  /usr/bin/time -v timeout ${SGPT_TIMEOUT:-900} python3 -m slidesparse.cli convert "$sgpt_base" "$MODELS/sparsegpt-out" \
    --sparsity 2_8 --dtype fp8 --prune sparsegpt --device cuda --calib-samples 128 --calib-len 2048 --json --overwrite
  echo "exit $? at $(date -u +%T)"
  du -sb "$MODELS/sparsegpt-out" 2>/dev/null
  rm -rf "$MODELS/sparsegpt-out"
}
wait_for() {  # FILE SECONDS: wait up to SECONDS for FILE (a later device call may bring it)
  for _ in $(seq 1 $(( $2 / 10 ))); do [ -f "$1" ] && return 0; sleep 10; done
  [ -f "$1" ]
}
sgpt=
# SGPT_WHEN=beside runs it beside the tests and the CPU conversions (its time is then an upper
# bound, and the stages after the tests wait for it); the default runs it alone, after the rest
if [[ " $STAGES " == *" sparsegpt "* && ${SGPT_WHEN:-last} == beside ]]; then
  sparsegpt_timed "beside tests/gpu and the CPU conversions" > "$RES/sparsegpt_7b.log" 2>&1 &
  sgpt=$!
  say "sparsegpt conversion in the background (sparsegpt_7b.log)"
fi

if [[ " $STAGES " == *" tests "* ]]; then
  say "tests/gpu"
  timeout ${TEST_TIMEOUT:-600} python3 -m pytest -m gpu ${TESTS:-tests/gpu} -q -p no:cacheprovider -ra --junitxml="$RES/gpu_tests_junit.xml" \
    > "$RES/gpu_tests.log" 2>&1
  rc=$?   # 124: the timeout, which can cut the summary line (the junit file has the counts)
  say "tests/gpu: exit $rc, $(grep -E '[0-9]+ (passed|failed)' "$RES/gpu_tests.log" | tail -n 1)"
fi
wait $prep
say "checkpoints ready: $(ls "$MODELS" | tr '\n' ' ')"
if [ -n "$sgpt" ]; then wait $sgpt; say "sparsegpt: $(grep -E 'Elapsed|^exit' "$RES/sparsegpt_7b.log" | tr '\n' ' ')"; fi
df -h "$MODELS" | tail -1 | tee -a "$RES/session.log"
sparsegpt_alone() {
  say "sparsegpt conversion, alone"
  sparsegpt_timed "alone on the host" > "$RES/sparsegpt_7b.log" 2>&1
  say "sparsegpt: $(grep -E 'Elapsed|^exit' "$RES/sparsegpt_7b.log" | tr '\n' ' ')"
}
if [[ " $STAGES " == *" sparsegpt "* && ${SGPT_WHEN:-last} == first ]]; then sparsegpt_alone; fi

gemm_compare() {  # $1: output name, then extra arguments
  local name=$1; shift
  local pp=
  if ls .whl/torchao-*.whl >/dev/null 2>&1; then   # a private target: vLLM in the same env never sees it
    [ -d /root/torchao_site ] || python3 -m pip install -q --no-deps --target /root/torchao_site .whl/torchao-*.whl
    pp=/root/torchao_site
  fi
  mkdir -p "$RES/gemm"
  PYTHONPATH=$pp${PYTHONPATH:+:$PYTHONPATH} timeout ${GEMM_TIMEOUT:-600} python3 tools/gpu_gemm_compare.py \
    --out "$RES/gemm/$name" --presets "${GEMM_PRESETS:-qwen2.5-7b,llama3.2-1b}" --m "${GEMM_M:-64,256,1024,4096,16384}" \
    --patterns 2_4,2_8 --dtypes fp8,int8 --reps 5 --rounds 3 "$@"
}
if [[ " $STAGES " == *" gemm "* ]]; then
  # our kernel's library may come with a later device call: wait for it (GEMM_LIB_WAIT s) rather
  # than run the comparison without it
  lib=${SLIDESPARSE_CUTLASS_LIB:-build/csrc/libslidesparse_cutlass.so}
  wait_for "$lib" ${GEMM_LIB_WAIT:-0} || say "gemm: $lib not there: the comparison runs without SlideSparse's kernel"
  say "gemm compare (tools/gpu_gemm_compare.py)"
  gemm_compare compare > "$RES/gemm_compare.log" 2>&1
  say "gemm: exit $?"
fi
if [[ " $STAGES " == *" gemmclocks "* ]]; then
  # sustained runs of each kernel with the SM clock and power sampled beside them: the clock and
  # the per-cycle share of the MMA peak, apart (tools/gpu_gemm_clocks.py)
  say "gemm clocks (tools/gpu_gemm_clocks.py)"
  mkdir -p "$RES/gemm"
  timeout ${GEMM_TIMEOUT:-600} python3 tools/gpu_gemm_clocks.py --out "$RES/gemm/clocks_${CLOCKS_PRESET:-qwen2.5-7b}" \
    --preset "${CLOCKS_PRESET:-qwen2.5-7b}" --m "${CLOCKS_M:-16384}" > "$RES/gemm_clocks.log" 2>&1
  say "gemm clocks: exit $?"
fi

if [[ " $STAGES " == *" ncu "* ]]; then
  # the hardware counters of the same kernels (tools/gpu_ncu_gemm.py): tensor pipe, shared-memory
  # banks, L2/DRAM, stalls; NCU_DTYPES (fp8), NCU_PRESET (CLOCKS_PRESET), NCU_M (CLOCKS_M)
  say "ncu counters (tools/gpu_ncu_gemm.py)"
  mkdir -p "$RES/ncu"
  timeout ${NCU_TIMEOUT:-420} python3 tools/gpu_ncu_gemm.py --out "$RES/ncu/ncu_${NCU_PRESET:-${CLOCKS_PRESET:-qwen2.5-7b}}" \
    --preset "${NCU_PRESET:-${CLOCKS_PRESET:-qwen2.5-7b}}" --m "${NCU_M:-${CLOCKS_M:-16384}}" --dtypes "${NCU_DTYPES:-fp8}" \
    > "$RES/ncu.log" 2>&1
  say "ncu: exit $?"
fi

# the checkpoints the preparation made (a conversion can fail, e.g. on a full disk: the 64 GB host
# holds the 7B base and about six 8-bit variants; one missing folder must not stop the others' tuning)
ready_ckpts=()
for d in "${sparse_ckpts[@]}"; do
  if [ -f "$d/config.json" ]; then ready_ckpts+=("$d"); else say "not made (prepare.log says why): $d"; fi
done
if [[ " $STAGES " == *" tune "* ]] && [ ${#ready_ckpts[@]} -gt 0 ]; then
  say "tune ${#ready_ckpts[@]} checkpoints"
  ( time ss tune "${ready_ckpts[@]}" ${TUNE_M:+--m "$TUNE_M"} ) > "$RES/tune.log" 2>&1
  mkdir -p "$RES/tuning"
  for d in "${ready_ckpts[@]}"; do cp "$d/slidesparse_tuning.json" "$RES/tuning/$(basename "$d").json" 2>/dev/null; done
  say "tune: $(grep -c wrote "$RES/tune.log") written, $(grep real "$RES/tune.log")"
fi

if [[ " $STAGES " == *" fusion "* ]]; then
  # the lift fusion before and after: the producer kernels alone, then prefill (and decode) profiles
  # of FUSION_VARIANT with every bucket sparse (a copy without its tuning table), the fusion pass
  # on and off (SLIDESPARSE_LIFT_FUSION=0: the codes-then-lift form); no compile cache between them
  say "fused-lift kernel bench"
  timeout ${FUSION_BENCH_TIMEOUT:-300} python3 tools/gpu_fused_lift_bench.py --out "$RES/fused_lift" \
    > "$RES/fused_lift_bench.log" 2>&1
  say "fused-lift bench: exit $?"
  src=$(ckpt "${FUSION_VARIANT:-2_8-fp8}"); dst=$src-all-sparse
  # a copy (the checkpoint validation refuses files that link outside the folder)
  [ -f "$dst/config.json" ] || { mkdir -p "$dst"; for f in "$src"/*; do [ "$(basename "$f")" = slidesparse_tuning.json ] || cp "$f" "$dst/"; done; }
  for mode in ${FUSION_MODES:-1 0}; do
    name=$(basename "$dst")-fusion$mode
    say "profile $name"
    SLIDESPARSE_LIFT_FUSION=$mode VLLM_DISABLE_COMPILE_CACHE=1 timeout ${PROFILE_TIMEOUT:-300} python3 tools/gpu_profile_vllm.py \
      --out "$RES/profile" --decode-seqs "${FUSION_DECODE_M:-0}" "$name=$dst" > "$RES/profile_$name.log" 2>&1
    say "profile $name: exit $?"
  done
fi

if [[ " $STAGES " == *" e2e "* ]]; then
  say "e2e matrix"
  ss bench e2e --matrix --models "$PRESET" --variants "$VARIANTS" --prefill-m "${PREFILL_M:-16384}" \
    --decode-m "${DECODE_M:-256}" --ckpt-dir "$MODELS" --out "$RES/e2e_matrix" ${E2E_ARGS:-} > "$RES/e2e.log" 2>&1
  say "e2e: exit $?"
fi

if [[ " $STAGES " == *" crosscheck "* ]]; then
  # the sweep against stock `vllm bench throughput` at one prefill and one decode point, for
  # CC_VARIANTS (fp8) of the e2e stage's matrix: its points are there, so only the benches run
  say "cross-check ${CC_VARIANTS:-fp8} (vllm bench throughput)"
  ss bench e2e --matrix --models "$PRESET" --variants "${CC_VARIANTS:-fp8}" --prefill-m "${PREFILL_M:-16384}" \
    --decode-m "${DECODE_M:-256}" --ckpt-dir "$MODELS" --out "$RES/e2e_matrix" --crosscheck \
    --crosscheck-prefill-m "${CC_PREFILL_M:-16384}" --crosscheck-decode-m "${CC_DECODE_M:-256}" \
    > "$RES/crosscheck.log" 2>&1
  say "cross-check: exit $?, $(grep -E 'bench' "$RES/crosscheck.log" | tail -n 2 | tr '\n' ' ')"
fi

if [[ " $STAGES " == *" e2e_b "* ]]; then
  first=${VARIANTS%%,*}; ckargs=(); names=$first
  for v in ${OBJ_VARIANTS//,/ }; do
    src=$(ckpt "$v"); dst=$src-prefill-objective
    if [ ! -f "$dst/slidesparse_tuning.json" ]; then
      mkdir -p "$dst"; for f in "$src"/*; do [ "$(basename "$f")" = slidesparse_tuning.json ] || ln -sf "$f" "$dst/"; done
      ( time ss tune "$dst" --objective prefill ${TUNE_M:+--m "$TUNE_M"} ) >> "$RES/tune_prefill_objective.log" 2>&1
      mkdir -p "$RES/tuning"; cp "$dst/slidesparse_tuning.json" "$RES/tuning/$(basename "$dst").json" 2>/dev/null
    fi
    ckargs+=(--ckpt "$v=$dst"); names+=",$v"
  done
  say "e2e matrix b: $names (prefill objective: $OBJ_VARIANTS)"
  ss bench e2e --matrix --models "$PRESET" --variants "$names" --prefill-m "${PREFILL_M:-16384}" \
    --decode-m "${DECODE_M:-256}" --ckpt-dir "$MODELS" "${ckargs[@]}" --out "$RES/e2e_matrix_b" ${E2E_ARGS:-} > "$RES/e2e_b.log" 2>&1
  say "e2e_b: exit $?"
fi

if [[ " $STAGES " == *" profile "* ]]; then
  for v in ${PROFILE_VARIANTS//,/ }; do   # a variant name, or NAME=CHECKPOINT
    case $v in *=*) spec=$v; v=${v%%=*};; *) spec="$v=$(ckpt "$v")";; esac
    say "profile $spec"
    timeout ${PROFILE_TIMEOUT:-300} python3 tools/gpu_profile_vllm.py --out "$RES/profile" --decode-seqs "${PROFILE_DECODE_M:-256}" \
      --batched "${PROFILE_M:-16384}" "$spec" > "$RES/profile_$v.log" 2>&1
    say "profile $v: exit $?"
  done
fi

if [[ " $STAGES " == *" hostcost "* ]]; then
  say "host cost of one layer call (tools/gpu_host_cost.py)"
  for shape in "2048 2048 2_4 fp8_e4m3" "2048 8192 2_4 int8" "3072 2048 2_8 fp8_e4m3"; do  # M=1024: above the CUDA graphs
    set -- $shape
    timeout 300 python3 tools/gpu_host_cost.py --n $1 --k $2 --sparsity $3 --dtype $4 --m ${HOSTCOST_M:-1024} >> "$RES/host_cost.txt" 2>&1
  done
  say "hostcost: exit $?"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  say "kernel bench"
  timeout -s INT -k 20 ${BENCH_TIMEOUT:-420} python3 -m slidesparse.cli bench kernel --presets "$PRESET" --m "${BENCH_M:-256,16384}" \
    --dtypes fp8_e4m3,int8 --sparsities 2_4,2_8 --rounds "${BENCH_ROUNDS:-2}" --forms "${BENCH_FORMS:-eager,traced,in_op}" --out "$RES/kernel_bench" \
    > "$RES/bench.log" 2>&1
  say "bench: exit $?"
fi
if [[ " $STAGES " == *" gemm010 "* ]]; then
  lib=${CSLT010:-/root/c/libcusparseLt.so.0}
  if wait_for "$lib" ${GEMM010_WAIT:-0}; then
    say "gemm compare, cuSPARSELt 0.8 and 0.10 ($lib)"
    gemm_compare compare_cslt010 --only cusparselt --cslt010 "$lib" > "$RES/gemm_cslt010.log" 2>&1
    say "gemm010: exit $?"
  else
    say "gemm010: $lib not there, not run"
  fi
fi
if [[ " $STAGES " == *" sparsegpt "* && ${SGPT_WHEN:-last} == last ]]; then sparsegpt_alone; fi
say "session done"
