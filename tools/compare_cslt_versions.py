"""Compare the sparse GEMM times of kernel-bench runs made with cuSPARSELt 0.8 and 0.10.

tools/gpu_cslt_version.sh makes three runs in one machine session: a_08 (torch's 0.8.0),
b_010 (0.10.0 through LD_PRELOAD) and c_08 (0.8.0 again). Each sparse GEMM is compared with the
mean of the two 0.8 runs; the spread between a_08 and c_08 is the noise the ratio must beat.

    python tools/compare_cslt_versions.py DIR   (DIR holds a_08/, b_010/, c_08/; writes DIR/compare.{md,json})
"""
import json
import statistics
import sys
from pathlib import Path


def gemm_times(run_dir: Path) -> dict:
    rows = json.loads((run_dir / "kernel_bench.json").read_text())["rows"]
    return {(r["preset"], r["layer"], r["m"], r["dtype"], r["variant"]): r["ms"]
            for r in rows if r["part"] == "gemm" and r["impl"] == "cusparselt"}


def main(root: str) -> None:
    root = Path(root)
    a, b, c = (gemm_times(root / r) for r in ("a_08", "b_010", "c_08"))
    rows = []
    for key in sorted(a):
        ref = (a[key] + c[key]) / 2
        rows.append(dict(zip(("preset", "layer", "m", "dtype", "variant"), key),
                         ms_08=ref, ms_010=b[key], ratio_010_over_08=b[key] / ref,
                         drift_08=abs(a[key] - c[key]) / ref))
    groups = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["variant"]), []).append(r)
    lines = ["# cuSPARSELt 0.10.0 vs 0.8.0: sparse GEMM time (0.10 / mean of two 0.8 runs; < 1 means 0.10 is faster)", "",
             f"Runs: {', '.join(str(root / r) for r in ('a_08', 'b_010', 'c_08'))}", "",
             "| dtype | pattern | geomean 0.10/0.8 | min | max | median drift between the 0.8 runs |",
             "|---|---|---|---|---|---|"]
    for (dtype, variant), rs in sorted(groups.items()):
        ratios = [r["ratio_010_over_08"] for r in rs]
        geo = statistics.geometric_mean(ratios)
        lines.append(f"| {dtype} | {variant} | {geo:.3f} | {min(ratios):.3f} | {max(ratios):.3f} | "
                     f"{statistics.median(r['drift_08'] for r in rs):.3f} |")
    allr = [r["ratio_010_over_08"] for r in rows]
    lines += ["", f"All {len(allr)} sparse GEMMs: geomean {statistics.geometric_mean(allr):.3f}, "
              f"median drift between the two 0.8 runs {statistics.median(r['drift_08'] for r in rows):.3f}.", "",
              "| preset | layer | M | dtype | pattern | 0.8 ms | 0.10 ms | ratio | 0.8 drift |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['layer']} | {r['m']} | {r['dtype']} | {r['variant']} | {r['ms_08']:.4f} | "
                     f"{r['ms_010']:.4f} | {r['ratio_010_over_08']:.3f} | {r['drift_08']:.3f} |")
    (root / "compare.md").write_text("\n".join(lines) + "\n")
    (root / "compare.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines[:6 + len(groups) + 2]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    main(sys.argv[1])
