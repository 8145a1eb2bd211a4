"""What limits the sparse GEMM, from the hardware counters: Nsight Compute (ncu) on each kernel of
tools/gpu_gemm_clocks.py, one launch per (kernel, layer) (GPU host).

The clock tool splits a kernel's speed into SM clock x share of the MMA peak per cycle; it found
the dense FP8 GEMM at 84% of its peak per cycle and the 2:4 kernels at 52-62% of theirs. The
account in docs/cutlass.md blames shared memory: a sparse m64nNk64 wgmma reads its whole B tile
(x', dense) from shared memory for twice the MMA work of a dense one, so at the 2:4 peak the B
reads alone would take 128 bytes per SM-cycle, all of what shared memory serves. This tool asks
the counters: per kernel, the SM cycles, the tensor pipe's active share, the shared-memory data
banks' read and write traffic against their peak, the L2 and DRAM throughput, and the warp stall
reasons, with ncu's clock control (base clock: per-cycle shares, not the power cap, compare).

    python tools/gpu_ncu_gemm.py --out results/H200/cutlass/ncu/ncu_qwen2.5-7b --preset qwen2.5-7b --m 16384

writes OUT.json (per launch: every collected metric with its unit; per kernel: sums over the
layers), OUT.md (the table), OUT.metrics.txt (what this ncu offers, the selection's source) and
keeps the ncu report OUT.ncu-rep. The child it profiles (`--launch MANIFEST`) runs each launch
between cudaProfilerStart/Stop, so nothing else (set-up, the configuration choice) is profiled.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

PEAK_PER_SM_CYCLE = {"dense": 8192, "sparse": 16384}   # 8-bit MMA flops per SM per cycle (Hopper)

# base names asked for when this ncu knows them (ncu --query-metrics); a missing one is left out
# and named in the output, so one ncu version's spelling does not fail the run
WANTED = [
    r"sm__cycles_elapsed", r"sm__cycles_active", r"gpu__time_duration",
    r"sm__pipe_tensor_op_gmma_cycles_active", r"sm__inst_executed_pipe_tensor_op_gmma",
    r"sm__pipe_tensor_op_hmma_cycles_active", r"sm__pipe_tensor_cycles_active",
    r"l1tex__data_bank_reads", r"l1tex__data_bank_writes", r"l1tex__data_pipe_lsu_wavefronts_mem_shared",
    r"l1tex__data_bank_conflicts_pipe_lsu_mem_shared", r"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_gmma",
    r"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_gmma", r"l1tex__lsuin_requests_op_gmma",
    r"sm__inst_executed_pipe_tensor", r"sm__pipe_tensor_op_gmma_cycles_active_realtime",
    r"l1tex__throughput", r"lts__throughput", r"dram__throughput", r"dram__bytes_read", r"dram__bytes_write",
    r"lts__t_bytes", r"sm__throughput", r"l1tex__m_xbar2l1tex_read_bytes",
    r"sm__ops_path_tensor_src_fp8.*", r"sm__ops_path_tensor_src_int8.*",
]   # stall reasons come with the WarpStateStats section
SECTIONS = ["SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "WarpStateStats", "LaunchStats"]


def query(ncu: str, out_txt: Path) -> dict[str, str]:
    """base metric name -> type (Counter, Ratio, Throughput) for the GPU at hand."""
    p = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=300)
    out_txt.write_text(p.stdout + p.stderr)
    found = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("Counter", "Ratio", "Throughput") and "__" in parts[0]:
            found[parts[0]] = parts[1]
    return found


def select(found: dict[str, str]) -> tuple[list[str], list[str]]:
    """(ncu --metrics entries, patterns of WANTED no name matched)."""
    metrics, missing = [], []
    for pat in WANTED:
        names = [n for n in found if re.fullmatch(pat, n)]
        if not names:
            missing.append(pat)
        for n in names:
            t = found[n]
            if t == "Counter":
                metrics += [f"{n}.sum", f"{n}.avg", f"{n}.sum.peak_sustained", f"{n}.avg.pct_of_peak_sustained_elapsed"]
            elif t == "Throughput":
                metrics += [f"{n}.avg.pct_of_peak_sustained_elapsed"]
            else:
                metrics += [f"{n}.ratio"]
    return list(dict.fromkeys(metrics)), missing


def launch(manifest: Path, preset: str, m: int, dtypes: list[str], patterns: list[str]) -> int:
    """The profiled child: each (kernel, layer) once inside its own profiler range."""
    import torch
    import gpu_gemm_clocks as clocks
    import gpu_gemm_compare as gcmp
    layers = list(gcmp.shapes(preset))
    g = torch.Generator(device="cuda").manual_seed(1234)
    cudart = torch.cuda.cudart()
    # after each launch, inside its range, a fill kernel marks where the launch's kernels end (a
    # launch may run more than one: a split-K reduction, a workspace clear)
    marker = torch.empty(1, device="cuda")
    entries = []
    for dname in dtypes:
        sets = clocks.layer_sets(preset, m, dname, patterns, g)
        for name, s in sets.items():
            if isinstance(s, str):
                entries.append({"dtype": dname, "kernel": name, "error": s})
                continue
            if " slidesparse_cutlass " in name and not name.endswith("plain epilogue"):
                continue   # the twin of the plain epilogue: the same configuration as the best one, or a slower one
            for i, fn in enumerate(s["fns"]):
                fn()
                torch.cuda.synchronize()
                cudart.cudaProfilerStart()
                fn()
                marker.fill_(float(len(entries)))
                torch.cuda.synchronize()
                cudart.cudaProfilerStop()
                n, k = gcmp.shapes(preset)[layers[i]]
                kk = k
                if s["kind"] == "sparse":   # the MMA runs the layer's padded lifted K'
                    kk = -(-gcmp.pattern_mod().parse_pattern(name.split()[0]).lifted_k(k) // 64) * 64
                entries.append({"dtype": dname, "kernel": name, "kind": s["kind"], "layer": layers[i], "n": n, "k": k,
                                "m": m, "flops": 2 * m * n * k, "mma_flops": 2 * m * n * kk, "config": s["configs"][i]})
        del sets
        torch.cuda.empty_cache()
    manifest.write_text(json.dumps(entries, indent=1))
    return 0


def read_raw_csv(text: str) -> tuple[list[dict], dict]:
    """ncu --page raw --csv: a header row, a units row, one row per profiled kernel."""
    rows = list(csv.reader(io.StringIO(text[text.find('"ID"'):] if '"ID"' in text else text)))
    if len(rows) < 2:
        return [], {}
    head, units = rows[0], rows[1]
    return [dict(zip(head, r)) for r in rows[2:] if len(r) == len(head)], dict(zip(head, units))


def num(v):
    try:
        return float(str(v).replace(",", ""))
    except (TypeError, ValueError):
        return None


MARKER = "FillFunctor"


def split_by_marker(kernels: list[dict]) -> list[list[dict]]:
    """The profiled kernels in launch order, cut at each marker: one list per launch."""
    groups, cur = [], []
    for r in kernels:
        if MARKER in r.get("Kernel Name", ""):
            groups.append(cur)
            cur = []
        else:
            cur.append(r)
    return groups


def summarize(entries: list[dict], groups: list[list[dict]], units: dict, sms: int) -> list[dict]:
    """Per (dtype, kernel): cycles and counters summed over the layers (and over a launch's kernels),
    percentages weighted by SM cycles."""
    by: dict = {}
    for e, rs in zip(entries, groups):
        for r in rs:
            by.setdefault((e["dtype"], e["kernel"]), []).append((e, r))
    out = []
    for (dname, kernel), pairs in by.items():
        cyc = [num(r.get("sm__cycles_elapsed.avg")) or 0.0 for _, r in pairs]
        total_cyc = sum(cyc)
        launches = list({id(e): e for e, _ in pairs}.values())
        row = {"dtype": dname, "kernel": kernel, "kind": pairs[0][0]["kind"], "layers": [e["layer"] for e in launches],
               "kernels_per_launch": len(pairs) / len(launches),
               "kernel_names": [r.get("Kernel Name", "")[:120] for _, r in pairs], "sm_cycles": total_cyc,
               "duration": sum(num(r.get("gpu__time_duration.sum")) or 0.0 for _, r in pairs),
               "duration_unit": units.get("gpu__time_duration.sum", ""), "metrics": {}}
        if total_cyc:
            mma = sum(e["mma_flops"] for e in launches)
            row["mma_share_per_cycle"] = mma / (total_cyc * sms * PEAK_PER_SM_CYCLE[row["kind"]])
        for key in pairs[0][1]:
            vals = [num(r.get(key)) for _, r in pairs]
            if any(v is None for v in vals) or not re.match(r"^[a-z0-9]+__", key):
                continue
            if key.endswith(("pct_of_peak_sustained_elapsed", ".ratio", ".pct")) and total_cyc:
                row["metrics"][key] = sum(v * c for v, c in zip(vals, cyc)) / total_cyc
            elif key.endswith(".sum"):
                row["metrics"][key] = sum(vals)
            elif key.endswith(".peak_sustained"):
                row["metrics"][key] = vals[0]
        # per SM-cycle rates of the shared-memory banks (the unit is ncu's, recorded beside)
        for base in ("l1tex__data_bank_reads", "l1tex__data_bank_writes", "l1tex__data_pipe_lsu_wavefronts_mem_shared",
                     "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_gmma"):
            s = row["metrics"].get(f"{base}.sum")
            if s is not None and total_cyc:
                row["metrics"][f"{base} per SM-cycle"] = s / (total_cyc * sms)
        out.append(row)
    return out


KEY_COLS = [  # (label, metric key) for the markdown table, when collected
    ("tensor pipe (GMMA) active", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed"),
    ("smem bank reads % peak", "l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed"),
    ("smem bank writes % peak", "l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed"),
    ("reads per SM-cycle", "l1tex__data_bank_reads per SM-cycle"),
    ("writes per SM-cycle", "l1tex__data_bank_writes per SM-cycle"),
    ("GMMA smem wavefronts per SM-cycle", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_gmma per SM-cycle"),
    ("L1/smem throughput %", "l1tex__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L2 %", "lts__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
]


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"# ncu counters of the GEMMs: {meta['preset']}, M={meta['m']}, four layers", "",
             f"Command: `{meta['command']}`", "",
             f"{meta.get('device', '')}, {meta['sms']} SMs, {meta['ncu_version']}; clock control: {meta['clock_control']}. "
             "One launch per kernel and layer; cycles are summed over the layers, percentages weighted by each "
             "launch's SM cycles. MMA share per cycle = 2MNK' / (SM cycles x SMs x peak per SM-cycle: 8192 dense "
             "8-bit, 16384 with 2:4).", ""]
    present = [(lab, key) for lab, key in KEY_COLS if any(key in r["metrics"] for r in rows)]
    lines += ["| dtype | kernel | SM cycles (M) | MMA share per cycle | " + " | ".join(lab for lab, _ in present) + " |",
              "|---|---|---:|---:|" + "---:|" * len(present)]
    for r in rows:
        cells = []
        for _, key in present:
            v = r["metrics"].get(key)
            cells.append("-" if v is None else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"))
        share = r.get("mma_share_per_cycle")
        lines.append(f"| {r['dtype']} | {r['kernel']} | {r['sm_cycles'] / 1e6:.2f} | "
                     f"{'-' if share is None else f'{share:.1%}'} | " + " | ".join(cells) + " |")
    lines += ["", "Kernels profiled (first layer's name):", ""]
    lines += [f"- {r['dtype']} {r['kernel']} ({r['kernels_per_launch']:g} per launch): `{r['kernel_names'][0]}`"
              for r in rows]
    if meta.get("missing"):
        lines += ["", "Asked for but not offered by this ncu: " + ", ".join(f"`{m}`" for m in meta["missing"])]
    if meta.get("errors"):
        lines += ["", "Not profiled:", ""] + [f"- {e['dtype']} {e['kernel']}: {e['error']}" for e in meta["errors"]]
    if meta.get("mismatch"):
        lines += ["", f"**Warning**: {meta['mismatch']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output path without extension")
    ap.add_argument("--preset", default="qwen2.5-7b")
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--dtypes", default="fp8,int8")
    ap.add_argument("--patterns", default="2_4,2_8")
    ap.add_argument("--clock-control", default="base", choices=["base", "none"])
    ap.add_argument("--ncu", default=None, help="ncu binary (default: on PATH or /usr/local/cuda/bin)")
    ap.add_argument("--launch", default=None, help=argparse.SUPPRESS)   # the profiled child's manifest path
    args = ap.parse_args()
    dtypes, patterns = args.dtypes.split(","), args.patterns.split(",")
    if args.launch:
        return launch(Path(args.launch), args.preset, args.m, dtypes, patterns)
    if not args.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    ncu = args.ncu or shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if Path(p).exists()), None)
    if not ncu:
        print("error: ncu not found (put Nsight Compute on PATH or pass --ncu)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    found = query(ncu, Path(f"{out}.metrics.txt"))
    metrics, missing = select(found)
    manifest, rep = Path(f"{out}.manifest.json"), Path(f"{out}.ncu-rep")
    child = [sys.executable, str(Path(__file__).resolve()), "--launch", str(manifest), "--preset", args.preset,
             "--m", str(args.m), "--dtypes", args.dtypes, "--patterns", args.patterns]
    base = [ncu, "--profile-from-start", "off", "--clock-control", args.clock_control, "--force-overwrite",
            "--export", str(rep)]
    sec = [a for s in SECTIONS for a in ("--section", s)]
    t0 = time.time()
    p = subprocess.run(base + sec + (["--metrics", ",".join(metrics)] if metrics else []) + child,
                       capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode != 0 or not rep.exists():
        # a metric this ncu rejects fails the whole run: once more with the sections alone
        print(f"ncu with the metric list failed (exit {p.returncode}): {log.strip().splitlines()[-1:]}; "
              "again with the sections only", flush=True)
        p = subprocess.run(base + sec + child, capture_output=True, text=True)
        log += "\n--- sections only ---\n" + p.stdout + p.stderr
    Path(f"{out}.ncu.log").write_text(log)
    if p.returncode != 0 or not rep.exists():
        print(f"error: ncu failed (exit {p.returncode}): {log.strip().splitlines()[-1] if log.strip() else ''}",
              file=sys.stderr)
        return 1
    imp = subprocess.run([ncu, "--import", str(rep), "--csv", "--page", "raw"], capture_output=True, text=True)
    Path(f"{out}.raw.csv").write_text(imp.stdout)
    kernels, units = read_raw_csv(imp.stdout)
    entries_all = json.loads(manifest.read_text())
    entries = [e for e in entries_all if "error" not in e]
    errors = [e for e in entries_all if "error" in e]
    groups = split_by_marker(kernels)
    mismatch = None
    if len(groups) != len(entries) or not all(groups):
        mismatch = (f"{len(groups)} marked launches profiled for {len(entries)} made (or a launch without a kernel): "
                    "no table; read OUT.raw.csv's kernel names")
    import torch
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = summarize(entries, groups, units, sms) if not mismatch else []
    ver = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    meta = {"preset": args.preset, "m": args.m, "command": "python " + shlex.join(sys.argv), "sms": sms,
            "device": torch.cuda.get_device_name(0), "ncu_version": ver[-1] if ver else "?",
            "clock_control": args.clock_control, "missing": missing, "errors": errors, "mismatch": mismatch,
            "seconds": round(time.time() - t0, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "metrics_asked": len(metrics)}
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows, "launches": entries,
                                               "kernels": kernels, "units": units}, indent=1))
    md = render(rows, meta)
    Path(f"{out}.md").write_text(md)
    print(md)
    return 0 if not mismatch else 1


if __name__ == "__main__":
    sys.exit(main())
