"""The activation side of a lifted linear, producer included, before and after the lift fusion.

For each producer of Qwen2.5-7B (add+RMSNorm at K=3584 feeding qkv/gate_up, SiLU*mul at K=18944
feeding down) and M tokens, device time (CUDA-graph replays) of:

    dense      Inductor's producer with the per-token quantization fused in (what dense W8A8 runs)
    before     the same, then the lift pass over the codes (lift_codes: the traced form until now)
    unfused    Inductor's producer writing bf16, then quant_lift (the quant+slide kernel): what
               runs where the pass finds no producer to fold into
    fused      kernels/fused_lift.py: the producer kernel writes x' itself
    before_deq, fused_deq   the same two with x read from the previous lifted layer's accumulator
               (the dequant fused into the producer: Inductor's before, ours after)

and the bytes each moves at the minimum (HBM), as GB/s. Run on the GPU host:

    python3 tools/gpu_fused_lift_bench.py --out DIR [--m 256,4096,16384] [--patterns 2_8] [--dtypes fp8,int8]

Writes DIR/fused_lift_bench.{json,md}; prints the table last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slidesparse.bench.harness import graph_time_ms
from slidesparse.core.pattern import parse_pattern
from slidesparse.core.quant import dtype_name, quantize_rows
from slidesparse.kernels import fused_lift as fl
from slidesparse.kernels.quant_slide import lift_codes, quant_slide

PRODUCERS = (("add_rms_norm", 3584), ("silu_mul", 18944))


def _forms(kind: str, m: int, k: int, sp: str, act: str):
    g = torch.Generator(device="cuda").manual_seed(m + k)
    if kind == "add_rms_norm":
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        r = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        w = (torch.rand(k, device="cuda", generator=g) + 0.5).bfloat16()
        prod = torch.compile(lambda: fl.add_rms_norm_ref(x, r, w, 1e-6), dynamic=False)
        dense = torch.compile(lambda: (quantize_rows(fl.add_rms_norm_ref(x, r, w, 1e-6)[0], act)), dynamic=False)
        fused = lambda: fl.add_rms_norm_quant_lift(x, r, w, 1e-6, sp, act, 64, 16)  # noqa: E731
        inputs, extra_out = 2 * m * k * 2 + 2 * k, m * k * 2   # x, r read; x + r written
    else:
        t = torch.randn(m, 2 * k, device="cuda", generator=g).bfloat16()
        prod = torch.compile(lambda: (fl.silu_mul_ref(t),), dynamic=False)
        dense = torch.compile(lambda: quantize_rows(fl.silu_mul_ref(t), act), dynamic=False)
        fused = lambda: fl.silu_mul_quant_lift(t, sp, act, 64, 16)  # noqa: E731
        inputs, extra_out = m * 2 * k * 2, 0

    # the same producer fed by the previous lifted layer's cuSPARSELt accumulator (bf16, unscaled):
    # before, Inductor fused that dequant into the producer; fused_deq folds it into our kernel
    width = k if kind == "add_rms_norm" else 2 * k
    acc = (torch.randn(m, width, device="cuda", generator=g) * 40).bfloat16()
    st = torch.rand(m, device="cuda", generator=g) * 0.05
    sc = torch.rand(width, device="cuda", generator=g) * 0.05
    dq = fl.Dequant(acc, st, sc, None, width, torch.bfloat16)
    if kind == "add_rms_norm":
        dense_deq = torch.compile(lambda: quantize_rows(fl.add_rms_norm_ref(dq.value(), r, w, 1e-6)[0], act),
                                  dynamic=False)
        fused_deq = lambda: fl.add_rms_norm_quant_lift(dq, r, w, 1e-6, sp, act, 64, 16)  # noqa: E731
    else:
        dense_deq = torch.compile(lambda: quantize_rows(fl.silu_mul_ref(dq.value()), act), dynamic=False)
        fused_deq = lambda: fl.silu_mul_quant_lift(dq, sp, act, 64, 16)  # noqa: E731

    def before():
        q, s = dense()
        return lift_codes(q, sp, 64, 16), s

    def before_deq():
        q, s = dense_deq()
        return lift_codes(q, sp, 64, 16), s

    def unfused():
        return quant_slide(prod()[0], sp, act, 64, 16)
    kq = parse_pattern(sp).lifted_k(k)
    bytes_min = {"dense": inputs + extra_out + m * k, "before": inputs + extra_out + m * k + m * k + m * kq,
                 "unfused": inputs + extra_out + 2 * m * k + 2 * m * k + m * kq, "fused": inputs + extra_out + m * kq}
    bytes_min["before_deq"] = bytes_min["before"]
    bytes_min["fused_deq"] = bytes_min["fused"]
    return {"dense": dense, "before": before, "unfused": unfused, "fused": fused, "before_deq": before_deq,
            "fused_deq": fused_deq}, bytes_min


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--m", default="256,4096,16384")
    ap.add_argument("--patterns", default="2_8")
    ap.add_argument("--dtypes", default="fp8,int8")
    a = ap.parse_args(argv)
    rows = []
    for act in (dtype_name(d) for d in a.dtypes.split(",")):
        for sp in a.patterns.split(","):
            for kind, k in PRODUCERS:
                for m in (int(v) for v in a.m.split(",")):
                    forms, nbytes = _forms(kind, m, k, sp, act)
                    for name, fn in forms.items():
                        ms = graph_time_ms(fn)
                        rows.append(dict(producer=kind, k=k, m=m, pattern=sp, dtype=act, form=name, ms=ms,
                                         min_bytes=nbytes[name], gbps=nbytes[name] / ms / 1e6))
                        print(f"{kind:13s} K={k:5d} M={m:6d} {sp} {act:9s} {name:8s} {ms:8.4f} ms "
                              f"{nbytes[name] / ms / 1e6:7.0f} GB/s", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fused_lift_bench.json").write_text(json.dumps(
        dict(command="python3 tools/gpu_fused_lift_bench.py " + " ".join(argv or __import__("sys").argv[1:]),
             device=torch.cuda.get_device_name(), rows=rows), indent=1))
    lines = ["| producer | M | pattern | dtype | dense ms | before ms | unfused ms | fused ms | fused vs before | "
             "fused over dense | before, x from a GEMM acc | fused, same | fused vs before |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    key = {}
    for r in rows:
        key.setdefault((r["producer"], r["m"], r["pattern"], r["dtype"]), {})[r["form"]] = r["ms"]
    for (p, m, sp, act), f in key.items():
        lines.append(f"| {p} | {m} | {sp} | {act} | {f['dense']:.4f} | {f['before']:.4f} | {f['unfused']:.4f} | "
                     f"{f['fused']:.4f} | {f['before'] / f['fused']:.2f}x | {(f['fused'] / f['dense'] - 1) * 100:+.0f}% | "
                     f"{f['before_deq']:.4f} | {f['fused_deq']:.4f} | {f['before_deq'] / f['fused_deq']:.2f}x |")
    (a.out / "fused_lift_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
