#!/usr/bin/env bash
# Build csrc/ into build/csrc/libslidesparse_cutlass.so: the CUTLASS SM90 (sm_90a) structured-sparse
# GEMM that slidesparse/kernels/cutlass_sparse.py loads through ctypes.
#
# It needs no GPU and no system CUDA toolkit: CUTLASS's headers come from the `nvidia-cutlass` wheel
# and nvcc from `nvidia-cuda-nvcc` (+ its crt/nvvm/cccl/runtime wheels), installed into a private
# venv (build/csrc-venv) on first use. The library links only libcudart.so.13, which torch's CUDA
# 13 build already loads (the nvidia-cuda-runtime wheel). Build once, then carry or copy the .so.
#
#   bash tools/build_csrc.sh                 # all configurations, jobs = CPU count
#   bash tools/build_csrc.sh --configs 0,5   # a subset (ids of csrc/ss_configs.h), for development
#   bash tools/build_csrc.sh --dry-run       # print the toolchain and the commands, build nothing
#
# Environment: SLIDESPARSE_CSRC_VENV (default build/csrc-venv), NVCC (use this nvcc instead),
# CUTLASS_INCLUDE (use these CUTLASS headers instead), JOBS.
# Outputs (git-ignored): build/csrc/libslidesparse_cutlass.so, build/csrc/obj/*.o,
# build/csrc/ptxas/*.log (nvcc -Xptxas -v: registers, shared memory, spills per kernel),
# build/csrc/build.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/csrc"
OUT="$ROOT/build/csrc"
VENV="${SLIDESPARSE_CSRC_VENV:-$ROOT/build/csrc-venv}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
CONFIGS=""
DRY=0

# Pinned to torch 2.11's CUDA 13.0 (a newer nvcc would emit code the 13.0 driver stack still runs,
# but one toolchain for everyone keeps the resource reports comparable).
PKGS=(nvidia-cutlass==4.2.0.0 nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96)

while [ $# -gt 0 ]; do
  case "$1" in
    --configs) CONFIGS="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n 2,20p "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "build_csrc.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "build_csrc.sh: $*" >&2; exit 1; }

NUM_CONFIGS="$(sed -n 's/^#define SS_NUM_CONFIGS \([0-9]*\)$/\1/p' "$SRC/ss_configs.h")"
[ -n "$NUM_CONFIGS" ] || die "cannot read SS_NUM_CONFIGS from csrc/ss_configs.h"
LISTED="$(grep -cE '^  X\([0-9]+,' "$SRC/ss_configs.h")"
[ "$LISTED" = "$NUM_CONFIGS" ] || die "csrc/ss_configs.h lists $LISTED configurations but SS_NUM_CONFIGS is $NUM_CONFIGS"
if [ -z "$CONFIGS" ]; then CONFIGS="$(seq -s, 0 $((NUM_CONFIGS - 1)))"; fi
IFS=, read -r -a IDS <<< "$CONFIGS"
for id in "${IDS[@]}"; do
  [[ "$id" =~ ^[0-9]+$ ]] && [ "$id" -lt "$NUM_CONFIGS" ] || die "bad configuration id '$id' (0..$((NUM_CONFIGS - 1)))"
done

# --- toolchain -------------------------------------------------------------------------------------
if [ -z "${NVCC:-}" ] || [ -z "${CUTLASS_INCLUDE:-}" ]; then
  PY="$VENV/bin/python"
  if [ ! -x "$PY" ]; then
    [ "$DRY" = 1 ] && { echo "would create $VENV and pip install ${PKGS[*]}"; PY=""; } || {
      echo "creating $VENV (CUTLASS headers and nvcc from the package registry)"
      python3 -m venv "$VENV" || die "python3 -m venv failed"
      "$PY" -m pip install -q "${PKGS[@]}" || die "pip install of the toolchain wheels failed"
    }
  fi
  if [ -n "$PY" ]; then
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    : "${NVCC:=$SITE/nvidia/cu13/bin/nvcc}"
    : "${CUTLASS_INCLUDE:=$SITE/cutlass_library/source/include}"
  fi
fi
CUDART_DIR="$(dirname "$(dirname "${NVCC:-/nonexistent/bin/nvcc}")")/lib"

if [ "$DRY" = 0 ]; then
  [ -x "$NVCC" ] || die "nvcc not found at $NVCC"
  [ -f "$CUTLASS_INCLUDE/cutlass/gemm/collective/builders/sm90_sparse_gmma_builder.inl" ] \
    || die "CUTLASS SM90 sparse headers not found under $CUTLASS_INCLUDE"
  [ -e "$CUDART_DIR/libcudart.so.13" ] || [ -e "$CUDART_DIR/libcudart.so" ] \
    || die "libcudart not found next to nvcc ($CUDART_DIR)"
fi

FLAGS=(-std=c++17 -O3 -DNDEBUG "-gencode=arch=compute_90a,code=sm_90a" --expt-relaxed-constexpr
       -Xcompiler=-fPIC -DCUTLASS_ENABLE_TENSOR_CORE_MMA=1 -DCUTLASS_DEBUG_TRACE_LEVEL=0
       -I"$SRC" -I"${CUTLASS_INCLUDE:-CUTLASS_INCLUDE}")

echo "nvcc:    ${NVCC:-?}"
echo "cutlass: ${CUTLASS_INCLUDE:-?}"
echo "configs: ${CONFIGS} (jobs $JOBS)"
if [ "$DRY" = 1 ]; then
  for id in "${IDS[@]}"; do
    echo "$NVCC ${FLAGS[*]} -Xptxas -v -DSS_CFG_ID=$id -c $SRC/ss_instance.cu -o $OUT/obj/cfg_$id.o"
  done
  echo "$NVCC ${FLAGS[*]} -c $SRC/ss_api.cu -o $OUT/obj/api.o"
  echo "$NVCC ${FLAGS[*]} -c $SRC/ss_lift.cu -o $OUT/obj/lift.o"
  echo "$NVCC -shared -o $OUT/libslidesparse_cutlass.so <objects> -L$CUDART_DIR -l:libcudart.so.13"
  exit 0
fi

mkdir -p "$OUT/obj" "$OUT/ptxas"
export NVCC SRC OUT
export FLAGS_STR="${FLAGS[*]}"
start=$(date +%s)
compile_one() {  # $1: config id or "api"
  local what="$1" t0; t0=$(date +%s)
  # shellcheck disable=SC2086
  if [ "$what" = lift ]; then
    "$NVCC" $FLAGS_STR -Xptxas -v -c "$SRC/ss_lift.cu" -o "$OUT/obj/lift.o.tmp" 2> "$OUT/ptxas/lift.log" \
      || { cat "$OUT/ptxas/lift.log" >&2; echo "FAILED lift" >&2; return 1; }
    mv "$OUT/obj/lift.o.tmp" "$OUT/obj/lift.o"
  elif [ "$what" = api ]; then
    "$NVCC" $FLAGS_STR -Xptxas -v -c "$SRC/ss_api.cu" -o "$OUT/obj/api.o.tmp" 2> "$OUT/ptxas/api.log" \
      || { cat "$OUT/ptxas/api.log" >&2; echo "FAILED api" >&2; return 1; }
    mv "$OUT/obj/api.o.tmp" "$OUT/obj/api.o"
  else
    "$NVCC" $FLAGS_STR -Xptxas -v -DSS_CFG_ID="$what" -c "$SRC/ss_instance.cu" -o "$OUT/obj/cfg_$what.o.tmp" \
      2> "$OUT/ptxas/cfg_$what.log" || { cat "$OUT/ptxas/cfg_$what.log" >&2; echo "FAILED config $what" >&2; return 1; }
    mv "$OUT/obj/cfg_$what.o.tmp" "$OUT/obj/cfg_$what.o"
  fi
  echo "  built $what in $(( $(date +%s) - t0 )) s"
}
export -f compile_one
# An object is rebuilt when it is missing, older than a source it includes, or built with other
# flags or another toolchain (obj/flags.txt): a full build takes ~18 minutes on two cores, and
# ss_api.cu or ss_lift.cu alone changes often.
stamp="$NVCC|$CUTLASS_INCLUDE|$FLAGS_STR"
if [ "$(cat "$OUT/obj/flags.txt" 2>/dev/null)" != "$stamp" ]; then rm -f "$OUT"/obj/*.o; fi
stale() {  # $1: object, then its sources
  local obj=$1; shift
  [ -f "$obj" ] || return 0
  for src in "$@"; do [ "$src" -nt "$obj" ] && return 0; done
  return 1
}
common=("$SRC/ss_cutlass.h" "$SRC/ss_configs.h" "$SRC/ss_layout.cuh")
todo=()
stale "$OUT/obj/api.o" "$SRC/ss_api.cu" "${common[@]}" && todo+=(api)
stale "$OUT/obj/lift.o" "$SRC/ss_lift.cu" "$SRC/ss_lift.h" "$SRC/ss_cutlass.h" && todo+=(lift)
for id in "${IDS[@]}"; do
  stale "$OUT/obj/cfg_$id.o" "$SRC/ss_instance.cu" "$SRC/ss_gemm.cuh" "${common[@]}" && todo+=("$id")
done
echo "objects to build: ${todo[*]:-none}"
if [ ${#todo[@]} -gt 0 ]; then
  printf '%s\n' "${todo[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one {}' \
    || die "compilation failed (logs in $OUT/ptxas/)"
fi
echo "$stamp" > "$OUT/obj/flags.txt"

objs=("$OUT/obj/api.o" "$OUT/obj/lift.o")
for id in "${IDS[@]}"; do objs+=("$OUT/obj/cfg_$id.o"); done
"$NVCC" -shared -o "$OUT/libslidesparse_cutlass.so.tmp" "${objs[@]}" -L"$CUDART_DIR" -l:libcudart.so.13 \
  || die "link failed"
mv "$OUT/libslidesparse_cutlass.so.tmp" "$OUT/libslidesparse_cutlass.so"
{
  echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - start )) s, configs $CONFIGS"
  echo "nvcc: $("$NVCC" --version | tail -1)"
  echo "cutlass: $CUTLASS_INCLUDE"
  ls -l "$OUT/libslidesparse_cutlass.so"
} | tee "$OUT/build.log"
# one line per kernel: registers, shared memory, spills (the full report stays in ptxas/)
grep -hE "Compiling entry|registers|spill" "$OUT"/ptxas/cfg_*.log > "$OUT/ptxas/summary.txt" || true
