"""GPU-host probe: what torch's cuSPARSELt bindings accept, and the accumulator/output-dtype trade.

Prints one JSON object (also written to $OUT/probe.json when OUT is set). Run: python3 tools/gpu_probe.py
"""

import json
import os
import statistics

import torch

from slidesparse.bench.kernel import graph_time_ms, pruned_slid_weight
from slidesparse.kernels import cusparselt as cl
from slidesparse.kernels.dequant import dequant
from slidesparse.kernels.quant_slide import quant_slide

res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "cusparselt": torch.backends.cusparselt.version()}
try:
    import importlib.metadata as md
    res["nvidia-cusparselt-cu13"] = md.version("nvidia-cusparselt-cu13")
except Exception as e:  # noqa: BLE001
    res["nvidia-cusparselt-cu13"] = repr(e)

gen = torch.Generator(device="cuda").manual_seed(0)
# accumulator / output dtype trade on Qwen2.5-7B gate_up at M=16384, 2_8
n, k, m = 37888, 3584, 16384
x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
for act in ("fp8_e4m3", "int8"):
    ws, sc = pruned_slid_weight(n, k, "2_8", act, gen)
    wc = cl.compress(ws)
    xq, st = quant_slide(x, "2_8", act, k_align=cl.K_ALIGN, m_align=cl.M_ALIGN)
    outs = [torch.bfloat16, torch.float32, torch.float16] + ([torch.int32] if act == "int8" else [])
    for od in outs:
        key = f"{act}->{str(od).split('.')[-1]}"
        try:
            acc = cl.sparse_mm(wc, xq, od)
            torch.cuda.synchronize()
            tg = statistics.median(graph_time_ms(lambda: cl.sparse_mm(wc, xq, od)) for _ in range(3))
            td = statistics.median(graph_time_ms(lambda: dequant(acc, st, sc, None, torch.bfloat16, m=m, n=n)) for _ in range(3))
            res[key] = {"gemm_ms": round(tg, 4), "dequant_ms": round(td, 4), "sum_ms": round(tg + td, 4),
                        "layout": list(acc.shape), "stride": list(acc.stride())}
        except Exception as e:  # noqa: BLE001
            res[key] = f"error: {str(e).splitlines()[0][:200]}"
    # without transpose_result (column-major D): does the strided dequant pay?
    try:
        acc = torch._cslt_sparse_mm(wc, xq.t(), out_dtype=torch.bfloat16)
        tg = statistics.median(graph_time_ms(lambda: torch._cslt_sparse_mm(wc, xq.t(), out_dtype=torch.bfloat16)) for _ in range(3))
        td = statistics.median(graph_time_ms(lambda: dequant(acc.t(), st, sc, None, torch.bfloat16, m=m, n=n)) for _ in range(3))
        res[f"{act}->bf16 no-transpose"] = {"gemm_ms": round(tg, 4), "dequant_ms": round(td, 4), "sum_ms": round(tg + td, 4)}
    except Exception as e:  # noqa: BLE001
        res[f"{act}->bf16 no-transpose"] = f"error: {str(e).splitlines()[0][:200]}"
    # algorithm ids and split-k that torch's binding accepts
    try:
        res[f"{act} search alg"] = cl.search_alg(wc, xq, torch.bfloat16)
        algs = cl.num_algs_probe(wc, xq, torch.bfloat16, limit=8)
        res[f"{act} alg ids"] = {a: round(statistics.median(graph_time_ms(lambda a=a: cl.sparse_mm(wc, xq, torch.bfloat16, alg_id=a)) for _ in range(2)), 4) for a in algs}
    except Exception as e:  # noqa: BLE001
        res[f"{act} search alg"] = f"error: {str(e).splitlines()[0][:200]}"
    del wc, ws, xq, acc
    torch.cuda.empty_cache()

print(json.dumps(res, indent=1))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "probe.json"), "w") as f:
        json.dump(res, f, indent=1)
