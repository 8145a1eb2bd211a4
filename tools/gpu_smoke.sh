#!/usr/bin/env bash
# On the GPU host, after the vLLM bundle is installed: serve tiny SlideSparse checkpoints in stock
# vLLM through the cusparselt backend (vLLM's default torch.compile + CUDA graphs) and through the
# reference backend, and compare the greedy tokens. Writes $OUT/smoke_*.json.
set -euo pipefail
source /tmp/site/env.sh
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 OUT=${OUT:-out/smoke}
mkdir -p "$OUT"
d=/root/models
slidesparse() { python3 -m slidesparse.cli "$@"; }
ckpts=()
for spec in "tiny-llama 2_8 fp8" "tiny-llama 2_4 int8" "tiny-qwen2 2_6 fp8" "tiny-bitnet 2_8 int8"; do
  set -- $spec
  [ -f "$d/$1/config.json" ] || slidesparse make-model --preset "$1" --out "$d/$1" >/dev/null
  c=$d/$1-SlideSparse-$2-$3
  [ -f "$c/config.json" ] || slidesparse convert "$d/$1" "$c" --sparsity "$2" --dtype "$3" >/dev/null
  ckpts+=("$c")
done
common=(--dtype bfloat16 --gpu-memory-utilization 0.15 --max-tokens 16)
SLIDESPARSE_BACKEND=cusparselt python3 -m slidesparse.runtime.greedy_check "$OUT/smoke_cusparselt.json" "${ckpts[@]}" --compile "${common[@]}" 2>&1 | tail -n 30 > "$OUT/smoke_cusparselt.log" || true
SLIDESPARSE_BACKEND=reference python3 -m slidesparse.runtime.greedy_check "$OUT/smoke_reference.json" "${ckpts[@]}" "${common[@]}" 2>&1 | tail -n 30 > "$OUT/smoke_reference.log" || true
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
try:
    a = json.load(open(f"{out}/smoke_cusparselt.json"))["results"]
    b = json.load(open(f"{out}/smoke_reference.json"))["results"]
except FileNotFoundError as e:
    print("smoke: missing result", e); sys.exit(1)
rows = []
for ck in a:
    ra, rb = a[ck], b.get(ck)
    if isinstance(ra, dict) or isinstance(rb, dict) or rb is None:
        rows.append((ck.split("/")[-1], "ERROR", str(ra)[:300] if isinstance(ra, dict) else str(rb)[:300]))
        continue
    same = sum(x == y for pa, pb in zip(ra, rb) for x, y in zip(pa, pb))
    total = sum(len(p) for p in ra)
    first = [next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), len(pa)) for pa, pb in zip(ra, rb)]
    rows.append((ck.split("/")[-1], f"{same}/{total} tokens equal", f"first divergence per prompt {first}"))
json.dump(rows, open(f"{out}/smoke_summary.json", "w"), indent=1)
for r in rows: print(" | ".join(r))
PY
