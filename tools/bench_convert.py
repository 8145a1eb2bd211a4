#!/usr/bin/env python
"""Benchmark of the converter: a Llama-3.2-1B-shaped model to SlideSparse 2_8 FP8 on this CPU.

Each conversion runs as its own `slidesparse convert` subprocess; wall time is measured around it
and peak RSS is that child's own ru_maxrss (os.wait4), so nothing else in this script counts.
In the same run, as baselines: a dense compressed-tensors FP8 export of the same model (read,
quantize, write: no pruning, sliding or packing) and a plain copy of the weight file (I/O floor).

    .venv/bin/python tools/bench_convert.py [--model-dir DIR] [--work DIR] [--repeat N]

Writes results/cpu/convert_llama3.2-1b_2_8_fp8.json and .md. Targets: <= 60 s, <= 3 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLIDESPARSE = [sys.executable, "-m", "slidesparse.cli"]
TARGET_S, TARGET_RSS_GB = 60.0, 3.0


def timed(cmd: list[str]) -> dict:
    """Run cmd as a child; wall seconds and the child's peak RSS (bytes; Linux reports KiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"error: {shlex.join(cmd)} failed ({p.returncode}): {err.strip()[-500:]}")
    return {"seconds": round(wall, 2), "peak_rss_bytes": ru.ru_maxrss * 1024,
            "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2)}


def machine() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, help="an existing llama3.2-1b make-model output (else made here)")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cpu")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_convert-"))
    work.mkdir(parents=True, exist_ok=True)
    src = args.model_dir or work / "llama3.2-1b"
    if not (src / "config.json").exists():
        print(f"making {src} ...", file=sys.stderr)
        subprocess.run(SLIDESPARSE + ["make-model", "--preset", "llama3.2-1b", "--out", str(src)], check=True)
    runs = {"convert_2_8_fp8": [], "baseline_dense_ct_fp8": [], "baseline_copy": []}
    cmds = {
        "convert_2_8_fp8": ["slidesparse", "convert", str(src), str(work / "out-2_8"), "--sparsity", "2_8",
                            "--dtype", "fp8", "--overwrite"],
        "baseline_dense_ct_fp8": ["slidesparse", "convert", str(src), str(work / "out-ct"), "--sparsity", "none",
                                  "--format", "compressed-tensors", "--dtype", "fp8", "--overwrite"],
        "baseline_copy": ["cp", "-r", str(src), str(work / "out-copy")],
    }
    load_before = os.getloadavg()
    for _ in range(args.repeat):
        for name, cmd in cmds.items():
            shutil.rmtree(work / "out-copy", ignore_errors=True)
            real = SLIDESPARSE + cmd[1:] if cmd[0] == "slidesparse" else cmd
            r = timed(real)
            runs[name].append(r)
            print(f"{name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    load_after = os.getloadavg()
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    conv = best["convert_2_8_fp8"]
    peak = max(r["peak_rss_bytes"] for r in runs["convert_2_8_fp8"])
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in (work / "out-2_8").glob("*.safetensors"))
    result = {
        "benchmark": "convert llama3.2-1b (random weights, real shapes, bf16) to SlideSparse 2_8 fp8",
        "command": shlex.join(cmds["convert_2_8_fp8"]).replace(str(work), "$WORK"),
        "baseline_commands": {k: shlex.join(v).replace(str(work), "$WORK") for k, v in cmds.items()
                              if k != "convert_2_8_fp8"},
        "bench_command": shlex.join(["python", "tools/bench_convert.py"] + sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_average_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "source_bytes": src_bytes, "output_bytes": out_bytes,
        "seconds": conv["seconds"], "peak_rss_bytes": peak,
        "runs": runs,
        "targets": {"seconds": TARGET_S, "peak_rss_gb": TARGET_RSS_GB},
        "meets_targets": conv["seconds"] <= TARGET_S and peak <= TARGET_RSS_GB * 1e9,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "convert_llama3.2-1b_2_8_fp8"  # (with_suffix would eat ".2-1b...")
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    md = [
        "# Converter benchmark: Llama-3.2-1B shapes -> SlideSparse 2_8 FP8 (CPU)", "",
        f"Measured {result['date_utc']} on {m['cpu']} ({m['cores']} cores, {m['memory']}), torch {m['torch']}, "
        f"{m['platform']}. 1-minute load average before/after: {result['load_average_1m_before_after']} "
        "(other work on the machine slows the numbers down).", "",
        f"Command: `{result['command']}` (source: `slidesparse make-model --preset llama3.2-1b`, "
        f"{src_bytes / 1e9:.2f} GB bf16; output {out_bytes / 1e9:.2f} GB).", "",
        "| run | seconds (best of %d) | peak RSS (GB) | user s | sys s |" % args.repeat,
        "|---|---:|---:|---:|---:|",
    ]
    for k, r in best.items():
        md.append(f"| {k} | {r['seconds']:.1f} | {max(x['peak_rss_bytes'] for x in runs[k]) / 1e9:.2f} | "
                  f"{r['user_s']:.1f} | {r['sys_s']:.1f} |")
    md += ["", f"Targets: <= {TARGET_S:.0f} s and <= {TARGET_RSS_GB:.0f} GB peak RSS: "
           f"**{'met' if result['meets_targets'] else 'NOT met'}**.", "",
           "Baselines in the same run: `baseline_dense_ct_fp8` is the dense compressed-tensors FP8 export "
           "(read, quantize, write; no pruning, sliding or packing); `baseline_copy` is `cp -r` of the "
           "source (the I/O floor).", "", f"Reproduce: `{result['bench_command']}`", ""]
    Path(f"{stem}.md").write_text("\n".join(md))
    print(json.dumps({k: result[k] for k in ("seconds", "peak_rss_bytes", "meets_targets")}))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
