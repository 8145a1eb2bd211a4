"""The tuner check (bench/tuner_check.py): matrix points beside the tuning table that served them."""

from __future__ import annotations

import json

import pytest

from slidesparse.core.tuning import TuningEntry, TuningTable

SETTINGS = {"repeats": 3}


def _point(variant, phase, m, tok_s, when, ckpt):
    return {"kind": "point", "model": "qwen2.5-7b", "variant": variant, "phase": phase, "m": m, "ok": True,
            "tok_s": tok_s, "step_s": m / tok_s, "spread": 0.01, "settings": SETTINGS, "time": when,
            "ckpt": f"/root/models/{ckpt}", "engine": {"weights_gib": 8.0}}


def _table(path, backends_by_bucket, us, us_dense):
    # two layer shapes, each with buckets 256 and 65536
    entries = []
    for n in (3584, 37888):
        for (m, b), t, d in zip(backends_by_bucket, us, us_dense):
            entries.append(TuningEntry(n=n, k_lifted=5376, dtype="int8", m_max=m, backend=b, us=t, us_sparse=t,
                                       us_dense=d))
    TuningTable(device="test", entries=tuple(entries)).save(path)


def _setup(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    name = "qwen2.5-7b-SlideSparse-2_8-int8"
    _table(old / f"{name}.json", [(256, "dense"), (65536, "dense")], [10.0, 100.0], [10.0, 100.0])
    _table(new / f"{name}.json", [(256, "sparse"), (65536, "sparse")], [9.0, 90.0], [10.0, 100.0])
    recs = [_point("int8", "prefill", 2048, 1000.0, "2026-12-03T02:00:00+0000", "qwen2.5-7b-w8a8-int8"),
            _point("int8", "decode", 128, 500.0, "2026-12-03T02:00:00+0000", "qwen2.5-7b-w8a8-int8"),
            # the old table's engine: at parity
            _point("2_8-int8", "decode", 128, 505.0, "2026-12-03T02:10:00+0000", name),
            # the new table's engine, later: predicted 1.111x, measured 0.9x
            _point("2_8-int8", "prefill", 2048, 900.0, "2026-12-03T05:50:00+0000", name)]
    return recs, old, new


def test_each_point_is_matched_with_the_table_of_its_time_and_flagged_where_the_tuner_was_wrong(tmp_path):
    from slidesparse.bench.tuner_check import check, markdown, parse_tuning_args
    recs, old, new = _setup(tmp_path)
    folders = parse_tuning_args([f"2026-12-03T05:30={new}", f"2026-12-03T01:45={old}"])
    rows = {(r["phase"], r["m"]): r for r in check(recs, folders)}
    assert set(rows) == {("decode", 128), ("prefill", 2048)}   # the baselines are not SlideSparse points
    dec, pre = rows[("decode", 128)], rows[("prefill", 2048)]
    assert dec["all_dense"] and dec["predicted"] == pytest.approx(1.0) and dec["bucket"] == 256
    assert dec["e2e"] == pytest.approx(1.01) and not dec["flagged"]
    assert not pre["all_dense"] and pre["bucket"] == 65536 and pre["layers"]["sparse"] == 2
    assert pre["predicted"] == pytest.approx(100 / 90) and pre["e2e"] == pytest.approx(0.9) and pre["flagged"]
    text = markdown(list(rows.values()))
    assert "| 2_8-int8 | prefill | 2048 | 65536 | cuSPARSELt 2 | 1.111 | 0.900 |" in text and "Flagged: 1" in text


def test_a_point_before_every_table_or_without_a_table_file_is_left_out(tmp_path):
    from slidesparse.bench.tuner_check import check, parse_tuning_args
    recs, old, new = _setup(tmp_path)
    # the decode point ran at 02:10, before the only table given: left out
    rows = check(recs, parse_tuning_args([f"2026-12-03T05:30={new}"]))
    assert [(r["phase"], r["m"]) for r in rows] == [("prefill", 2048)]
    (new / "qwen2.5-7b-SlideSparse-2_8-int8.json").unlink()
    assert check(recs, parse_tuning_args([f"2026-12-03T05:30={new}"])) == []


def test_the_command_line_reads_a_matrix_and_refuses_bad_arguments(tmp_path, capsys):
    from slidesparse.bench.tuner_check import main
    recs, old, new = _setup(tmp_path)
    mx = tmp_path / "mx"
    mx.mkdir()
    (mx / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "check.md"
    assert main(["--matrix", str(mx), "--tuning", f"2026-12-03T01:45={old}", "--tuning",
                 f"2026-12-03T05:30={new}", "--out", str(out)]) == 0
    assert "Flagged: 1" in out.read_text()
    for bad in (["--tuning", f"yesterday={old}"], ["--tuning", f"2026-12-03={tmp_path / 'none'}"],
                ["--tuning", str(old)]):
        assert main(["--matrix", str(mx), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    for args in (["--matrix", str(tmp_path / "nowhere")],
                 ["--matrix", str(mx), "--out", str(tmp_path / "no" / "such" / "dir" / "x.md")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "no").exists()


def test_an_engine_record_that_holds_its_table_wins_over_the_folders(tmp_path):
    """Engines record the table they served (e2e_worker.tuning_table_of); a later tune rewriting
    the checkpoint's file does not change what the points were served with."""
    from slidesparse.bench.tuner_check import check, parse_tuning_args
    recs, old, new = _setup(tmp_path)
    held = json.loads((old / "qwen2.5-7b-SlideSparse-2_8-int8.json").read_text())    # all dense
    engine = {"kind": "engine", "ok": True, "model": "qwen2.5-7b", "variant": "2_8-int8",
              "time": "2026-12-03T05:45:00+0000", "tuning": held}
    recs.insert(2, engine)
    rows = {(r["phase"], r["m"]): r for r in check(recs, parse_tuning_args([f"2026-12-03T05:30={new}"]))}
    assert rows[("prefill", 2048)]["all_dense"] and not rows[("prefill", 2048)]["flagged"]
    assert ("decode", 128) not in rows        # before that engine, and before the folder's time
    assert check(recs, []) and all(r["m"] == 2048 for r in check(recs, []))
    # a later engine that served no table: its points are not the earlier engine's
    recs.insert(3, {**engine, "time": "2026-12-03T05:48:00+0000", "tuning": None})
    assert check(recs, parse_tuning_args([f"2026-12-03T05:30={new}"])) == []


def test_the_worker_records_the_table_the_runtime_reads(tmp_path, monkeypatch):
    from slidesparse.bench.e2e_worker import tuning_table_of
    from slidesparse.core.format import TUNING_FILE
    from slidesparse.runtime.config import ENV_TUNING
    monkeypatch.delenv(ENV_TUNING, raising=False)
    assert tuning_table_of(str(tmp_path)) is None
    (tmp_path / TUNING_FILE).write_text(json.dumps({"format_version": 1, "entries": []}))
    assert tuning_table_of(str(tmp_path)) == {"format_version": 1, "entries": []}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format_version": 1, "entries": [], "device": "x"}))
    monkeypatch.setenv(ENV_TUNING, str(other))
    assert tuning_table_of(str(tmp_path))["device"] == "x"
