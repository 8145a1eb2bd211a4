"""Merge two kernel-benchmark runs into results/<device>/: take every row of BASE except the M
values in --replace-m, which come from PATCH (rows of one (shape, M, dtype) are always from one run,
so each baseline/candidate pair was still measured interleaved in the same process).

    python3 tools/gpu_merge_bench.py BASE.json PATCH.json --replace-m 65536 --out results/H100
"""

import argparse
import json
from pathlib import Path

from slidesparse.bench import report

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("patch")
ap.add_argument("--replace-m", type=int, nargs="+", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()
base, patch = json.loads(Path(a.base).read_text()), json.loads(Path(a.patch).read_text())
rows = [r for r in base["rows"] if r["m"] not in a.replace_m] + [r for r in patch["rows"] if r["m"] in a.replace_m]
env = dict(base["summary"]["env"])
penv = patch["summary"]["env"]
env["command"] = f"{env['command']}` + M={','.join(map(str, a.replace_m))} from `{penv['command']}"
if penv.get("partial"):
    env["note"] = (f"The M={','.join(map(str, a.replace_m))} run was stopped by its time limit: the configurations "
                   "it did not reach are absent (their sums show '-').")
env["copy_gbs"] = max(env.get("copy_gbs", 0), penv.get("copy_gbs", 0))
env.pop("partial", None)
for p in report.write_all(rows, env, Path(a.out)):
    print(p)
