"""The tuner's choices against the end-to-end matrix: does a plan that `slidesparse tune` found
faster on the linear layers make vLLM's steps faster?

    python -m slidesparse.bench.tuner_check --matrix results/H200/e2e_matrix \\
        --tuning 2026-12-03T01:45=results/H200/perf_session_2026-12-03/lease1/tuning \\
        --tuning 2026-12-03T05:30=results/H200/perf_session_2026-12-03/lease2/tuning \\
        --out results/H200/e2e_matrix/tuner_vs_e2e.md

A point of the matrix is matched with the tuning table its engine served: the one the engine
record holds (engines record their table since 2026-12-03), else the table file named after the
point's checkpoint folder in the folder of the latest SINCE at or before the point's time (every
tune rewrites a checkpoint's table, so the tables of a session hold from the time that session
tuned, UTC, as results.jsonl writes times: 2026-12-03T05:30). For the point's M the
bucket the runtime takes (the smallest m_max >= M, else the last) gives the tuner's prediction:
the chosen plan's time against the dense one, summed over the tuned layer shapes, each shape
counted once (every decoder layer of the presets has each of its four shapes once, so that is
the model's ratio). The prediction covers the linear layers only; the step also has attention,
norms and the host, so an end-to-end speed-up lies between 1 and the prediction when the
prediction holds. A point is flagged where the plan is not all dense, the tuner predicted no
loss, and the step came out below `floor` of the baseline.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..core.errors import SlideSparseError
from ..core.io import atomic_write
from ..core.tuning import BACKEND_NAMES, TuningTable
from . import e2e_matrix as mx

FLOOR = 0.98


class TunerCheckError(SlideSparseError):
    """Bad input to the tuner check (a --tuning argument, a missing folder)."""


TIME = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}(:\d{2}(:\d{2})?)?)?$")


def parse_tuning_args(items: list[str]) -> list[tuple[str, Path]]:
    """['SINCE=DIR', ...] -> [(since, folder)] in time order."""
    out = []
    for item in items:
        since, sep, folder = item.partition("=")
        if not sep or not TIME.match(since) or not folder:
            raise TunerCheckError(f"--tuning {item!r}: expected SINCE=FOLDER, SINCE a UTC time like 2026-12-03T05:30")
        if not Path(folder).is_dir():
            raise TunerCheckError(f"--tuning {item!r}: {folder} is not a folder")
        out.append((since, Path(folder)))
    return sorted(out)


def _engine_tables(records: list[dict]) -> dict:
    """{(model, variant): [(time, table dict or None), ...]} from the engine records that say what
    table they served (None: none; records from before 2026-12-03 do not say, and are left out)."""
    out: dict = {}
    for r in records:
        if r.get("kind") == "engine" and r.get("ok") and "tuning" in r:
            out.setdefault((r["model"], r["variant"]), []).append((str(r.get("time") or ""), r["tuning"]))
    return out


def _table_for(record: dict, folders: list[tuple[str, Path]], cache: dict, engines: dict) -> TuningTable | None:
    when, ckpt = str(record.get("time") or ""), record.get("ckpt")
    # the engine that measured the point started before it: the latest such engine's own table
    held = [t for started, t in engines.get((record.get("model"), record.get("variant")), []) if started <= when]
    if held:
        if not isinstance(held[-1], dict):
            return None       # that engine served no table
        key = ("engine", record["model"], record["variant"], len(held))
        if key not in cache:
            cache[key] = TuningTable.from_dict(held[-1], f"the engine record of {record['variant']}")
        return cache[key]
    if not when or not ckpt:
        return None
    # ISO times of one format compare as strings; a shorter SINCE is a prefix, so it sorts first
    folder = next((f for since, f in reversed(folders) if since <= when), None)
    if folder is None:
        return None
    path = folder / (Path(ckpt).name + ".json")
    if path not in cache:
        cache[path] = TuningTable.load(path) if path.is_file() else None
    return cache[path]


def bucket_row(summary: list[dict], m: int) -> dict:
    """The row of a table's plan_summary for the bucket the runtime serves M with."""
    return next((r for r in summary if r["m_max"] >= m), summary[-1])


def check(records: list[dict], folders: list[tuple[str, Path]], floor: float = FLOOR) -> list[dict]:
    """One row per SlideSparse point with a matching table: the bucket, its plan, the tuner's
    predicted linear-layer speed-up, the end-to-end speed-up, and whether it is flagged."""
    points = mx.latest(records, "point")
    speedups = {(r["model"], r["variant"], r["phase"], r["m"]): r for r in mx.table_rows(records)}
    cache: dict = {}
    summaries: dict = {}   # id(table) -> its plan_summary, computed once per table
    engines = _engine_tables(records)
    out = []
    for key, rec in points.items():
        if mx.parse_variant(rec["variant"]).kind != "slidesparse" or not rec.get("ok"):
            continue
        table = _table_for(rec, folders, cache, engines)
        if table is None or not table.entries:
            continue
        if id(table) not in summaries:
            summaries[id(table)] = table.plan_summary()
        b = bucket_row(summaries[id(table)], rec["m"])
        e2e = speedups.get(key, {}).get("speedup")
        all_dense = b["layers"]["dense"] == sum(b["layers"].values())
        pred = b["speedup"]
        flagged = (not all_dense and e2e is not None and pred is not None and pred >= 1.0 and e2e < floor)
        out.append({"model": rec["model"], "variant": rec["variant"], "phase": rec["phase"], "m": rec["m"],
                    "bucket": b["m_max"], "layers": b["layers"], "all_dense": all_dense,
                    "predicted": pred, "e2e": e2e, "spread": rec.get("spread"), "flagged": flagged})
    order = mx._order(list({r["variant"] for r in out}))
    out.sort(key=lambda r: (r["model"], order.index(r["variant"]), mx.PHASES.index(r["phase"]), r["m"]))
    return out


def _fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def markdown(rows: list[dict], floor: float = FLOOR) -> str:
    lines = ["# The tuner's choices against the end-to-end matrix", "",
             "Predicted: the tuned plan's linear layers against dense, as `slidesparse tune` timed them "
             "in the bucket serving M (each tuned shape once). End to end: the matrix's speed-up over the "
             f"same-dtype dense W8A8 baseline. Flagged (**!**): a plan that is not all dense, predicted >= 1, "
             f"and below {floor}x end to end. All-dense plans run the baseline's own kernels: their rows "
             "show the matrix's noise.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {model}", "",
                  "| variant | phase | M | bucket | plan (layer shapes) | predicted | end to end | spread | |",
                  "|---|---|---:|---:|---|---:|---:|---:|---|"]
        for r in (x for x in rows if x["model"] == model):
            plan = "all dense" if r["all_dense"] else ", ".join(
                f"{BACKEND_NAMES[k]} {v}" for k, v in r["layers"].items() if v)
            spread = "" if r["spread"] is None else f"{100 * r['spread']:.0f}%"
            lines.append(f"| {r['variant']} | {r['phase']} | {r['m']} | {r['bucket']} | {plan} | "
                         f"{_fmt(r['predicted'])} | {_fmt(r['e2e'])} | {spread} | {'**!**' if r['flagged'] else ''} |")
        lines.append("")
    flagged = [r for r in rows if r["flagged"]]
    mixed = [r for r in rows if not r["all_dense"] and r["e2e"] is not None and r["predicted"] is not None]
    agree = [r for r in mixed if (r["predicted"] >= 1.0) == (r["e2e"] >= 1.0)]
    lines += ["## Summary", "",
              f"- Points on a plan that is not all dense: {len(mixed)}; the tuner's sign (faster or not than "
              f"dense) agreed with end to end at {len(agree)}.",
              f"- Flagged: {len(flagged)}" + (": " + ", ".join(
                  f"{r['model']} {r['variant']} {r['phase']} M={r['m']} ({_fmt(r['predicted'])} predicted, {_fmt(r['e2e'])})"
                  for r in flagged) if flagged else "."), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slidesparse.bench.tuner_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", required=True, help="the matrix folder (its results.jsonl)")
    ap.add_argument("--tuning", action="append", default=[], help="SINCE=FOLDER: the tuning tables (named after "
                    "the checkpoint folders) that served from SINCE (UTC) on, for engines whose records hold "
                    "no table; repeat for each tune session")
    ap.add_argument("--out", help="markdown file to write (default: print)")
    ap.add_argument("--floor", type=float, default=FLOOR)
    a = ap.parse_args(argv)
    try:
        folders = parse_tuning_args(a.tuning)
        results = Path(a.matrix) / mx.RESULTS
        if not results.is_file():
            raise TunerCheckError(f"--matrix {a.matrix}: no {mx.RESULTS} there")
        records, _ = mx.read_results(results)
        text = markdown(check(records, folders, a.floor), a.floor)
        if a.out:
            atomic_write(a.out, text)
    except SlideSparseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if a.out:
        print(f"wrote {a.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
