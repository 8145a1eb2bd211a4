"""Which gather should quant+slide use? Times the lifted-pattern kernels of
slidesparse/kernels/quant_slide.py (tile, elem) against the dense quant-only kernel and the copy
bandwidth, in one run, after checking that they write the same bytes. (The committed
results/H100/quant_slide_gathers/lift_gathers.json also has a third, since removed, "pairs" kernel.)

    python3 tools/gpu_lift_gathers.py [--out DIR] [--rounds 3]

Prints a table last; writes lift_gathers.json under --out. Bandwidth counts x read once plus x'
and the scales written, over the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from slidesparse.bench.kernel import copy_bandwidth_gbs, graph_time_ms
from slidesparse.kernels import quant_slide as qs
from slidesparse.core.pattern import parse_pattern

GATHERS = ("tile", "elem")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/gathers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--m", default="4096,16384")
    ap.add_argument("--k", default="2048,3584,8192,18944")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    copy = copy_bandwidth_gbs()
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    rows = []
    for m in map(int, a.m.split(",")):
        for k in map(int, a.k.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for act in ("fp8_e4m3", "int8"):
                for sp in ("dense", "2_6", "2_8", "2_10", "2_inf"):
                    if sp == "dense":
                        fns = {"quant_only": lambda: qs.quant_only(x, act, 64, 16)}
                    else:
                        pat = parse_pattern(sp)
                        fns = {g: (lambda g=g, pat=pat: qs._launch(x, pat, act, 64, 16, None, False, g)) for g in GATHERS}
                        ref = fns["elem"]()[0].view(torch.uint8)
                        for g in GATHERS:
                            if not torch.equal(fns[g]()[0].view(torch.uint8), ref):
                                sys.exit(f"error: gather {g} disagrees with elem at m={m} k={k} {sp} {act}")
                    q = next(iter(fns.values()))()[0]
                    nbytes = x.numel() * 2 + q.numel() + 4 * m
                    times = {g: [] for g in fns}
                    for _ in range(a.rounds):          # interleaved rounds: drift hits every kernel alike
                        for g, f in fns.items():
                            times[g].append(graph_time_ms(f, target_ms=3.0))
                    for g, ts in times.items():
                        ms = statistics.median(ts)
                        rows.append(dict(m=m, k=k, act=act, sparsity=sp, gather=g, ms=ms,
                                         gbs=nbytes / ms / 1e6, of_copy=nbytes / ms / 1e6 / copy))
            print(f"m={m} k={k} done", flush=True)
    (out / "lift_gathers.json").write_text(json.dumps(dict(copy_gbs=copy, device=torch.cuda.get_device_name(),
                                                           command=" ".join(sys.argv), rows=rows), indent=1))
    print("\nm      k      act   sparsity  " + "  ".join(f"{g:>12}" for g in ("quant_only",) + GATHERS) + "   (ms, fraction of copy BW)")
    key = {(r["m"], r["k"], r["act"], r["sparsity"], r["gather"]): r for r in rows}
    for m in map(int, a.m.split(",")):
        for k in map(int, a.k.split(",")):
            for act in ("fp8_e4m3", "int8"):
                for sp in ("dense", "2_6", "2_8", "2_10", "2_inf"):
                    cells = []
                    for g in ("quant_only",) + GATHERS:
                        r = key.get((m, k, act, sp, g))
                        cells.append(f"{r['ms']:.3f} {r['of_copy']:.2f}" if r else " " * 10)
                    print(f"{m:<6} {k:<6} {act[:4]:<5} {sp:<9} " + "  ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
