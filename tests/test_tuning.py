"""The tuning table (core/tuning.py): validated once when read, round-trips, buckets per shape."""

from __future__ import annotations

import json

import pytest

from slidesparse.core.tuning import TuningEntry, TuningError, TuningTable


def _entry(**kw):
    return {"n": 64, "k_lifted": 96, "dtype": "int8", "m_max": 16, "backend": "sparse", "alg_id": 0, **kw}


def _table(*entries):
    return {"format_version": 1, "device": "NVIDIA H200", "library": "cuSPARSELt 800", "entries": list(entries)}


def test_round_trip_and_bucket_order(tmp_path):
    t = TuningTable.from_dict(_table(_entry(m_max=4096, alg_id=2, us=12.5), _entry(backend="dense"),
                                     _entry(dtype="fp8_e4m3", alg_id=1)))
    rows = t.buckets(64, 96, "int8")
    assert [e.m_max for e in rows] == [16, 4096] and rows[0].backend == "dense" and rows[1].alg_id == 2
    assert t.buckets(64, 96, "bf16") == () and t.buckets(65, 96, "int8") == ()
    t.save(tmp_path / "t.json")
    again = TuningTable.load(tmp_path / "t.json")
    assert again == t and again.to_dict() == t.to_dict()
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind


def test_the_first_tuners_files_still_read():
    d = _table({**_entry(), "split_k": 1, "split_k_buffers": None, "us": 3.0, "us_sparse": 3.0, "us_dense": 4.1})
    assert TuningTable.from_dict(d).entries[0] == TuningEntry(64, 96, "int8", 16, "sparse", 0, 1, 3.0, 3.0, 4.1)


@pytest.mark.parametrize("bad,words", [
    (_entry(alg_id=2 ** 40), "'alg_id' must be an integer in [0, 255]"),
    (_entry(split_k=-7), "'split_k' must be an integer in [1, 64]"),
    (_entry(m_max=-1), "'m_max' must be an integer"),
    (_entry(m_max=1.5), "'m_max' must be an integer"),
    (_entry(n=True), "'n' must be an integer"),
    (_entry(backend="gpu"), "'backend' must be one of sparse, cutlass, dense"),
    (_entry(dtype="int4"), "'dtype' must be one of"),
    (_entry(us=float("nan")), "'us' must be a non-negative number"),
    (_entry(colour="red"), "unknown key 'colour'"),
    ({"n": 1}, "'dtype' must be one of"),
    ("x", "entry 0 is not an object"),
])
def test_bad_entries_are_one_line_errors(bad, words):
    with pytest.raises(TuningError) as e:
        TuningTable.from_dict(_table(bad))
    assert words in str(e.value) and "entry 0" in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    p = tmp_path / "t.json"
    for text, words in (("{", "cannot read tuning file"), ("[]", "is not a JSON object"),
                        (json.dumps({"format_version": 2, "entries": []}), "format_version 2 is not supported"),
                        (json.dumps({"format_version": 1}), "has no 'entries' list"),
                        (json.dumps(_table(_entry(), _entry())), "same m_max"),
                        (json.dumps({**_table(), "device": 3}), "'device' must be a string")):
        p.write_text(text)
        with pytest.raises(TuningError, match=words):
            TuningTable.load(p)
    with pytest.raises(TuningError, match="cannot read"):
        TuningTable.load(tmp_path / "missing.json")


def test_cutlass_buckets_name_their_configuration():
    e = _entry(backend="cutlass", config="fp8_bf16_coop_128x256x128_c2x1:sw2")
    t = TuningTable.from_dict(_table(e))
    assert t.entries[0].config == "fp8_bf16_coop_128x256x128_c2x1:sw2"
    assert TuningTable.from_dict(t.to_dict()) == t
    for bad, words in ((_entry(backend="cutlass"), "needs a 'config'"),
                       (_entry(backend="cutlass", config="a; rm -rf"), "needs a 'config'"),
                       (_entry(config="x"), "'config' belongs to cutlass buckets")):
        with pytest.raises(TuningError, match=words):
            TuningTable.from_dict(_table(bad))


def test_plan_summary_weights_each_shape_by_its_layers_and_takes_the_runtimes_bucket():
    import random

    from slidesparse.core.tuning import count_layers, plan_lines

    rng = random.Random()
    t_qkv = [(64, rng.uniform(1, 9), rng.uniform(1, 9)), (4096, rng.uniform(10, 99), rng.uniform(10, 99))]
    t_mlp = [(256, rng.uniform(1, 9), rng.uniform(1, 9)), (4096, rng.uniform(10, 99), rng.uniform(10, 99))]
    entries = [_entry(n=64, k_lifted=96, m_max=m, backend="dense" if i else "sparse", us=us, us_dense=ud)
               for i, (m, us, ud) in enumerate(t_qkv)]
    entries += [_entry(n=128, k_lifted=96, m_max=m, backend="cutlass", config="int8_bf16_coop_128x256x128_c1x2",
                       us=us, us_dense=ud) for m, us, ud in t_mlp]
    table = TuningTable.from_dict(_table(*entries))
    # K' = 1.5 K (2_8): the model's layers, keyed as the table is
    shapes = {"l0.qkv": (64, 64), "l1.qkv": (64, 64), "l0.mlp": (128, 64), "l1.mlp": (128, 64), "l2.mlp": (128, 64)}
    counts = count_layers(shapes, lambda k: 3 * k // 2, "int8")
    assert counts == {(64, 96, "int8"): 2, (128, 96, "int8"): 3}
    rows = table.plan_summary(counts)
    assert [r["m_max"] for r in rows] == [64, 256, 4096]
    # the bound 64 takes qkv's M<=64 entry and the MLP's M<=256 one (the smallest m_max >= 64)
    pick = {64: (t_qkv[0], t_mlp[0]), 256: (t_qkv[1], t_mlp[0]), 4096: (t_qkv[1], t_mlp[1])}
    for r in rows:
        q, m = pick[r["m_max"]]
        assert r["us"] == pytest.approx(2 * q[1] + 3 * m[1]) and r["us_dense"] == pytest.approx(2 * q[2] + 3 * m[2])
        assert r["speedup"] == pytest.approx(r["us_dense"] / r["us"])
        assert r["layers"] == {"sparse": 2 if r["m_max"] == 64 else 0, "dense": 0 if r["m_max"] == 64 else 2,
                               "cutlass": 3}
    assert table.plan_summary()[0]["layers"] == {"sparse": 1, "cutlass": 1, "dense": 0}   # no counts: one each
    lines = plan_lines(rows)
    assert len(lines) == 3 and "cuSPARSELt 2, SlideSparse CUTLASS 3" in lines[0] and "no speed-up" not in " ".join(lines)


def test_plan_summary_says_when_nothing_is_sparse_and_when_a_time_is_missing():
    from slidesparse.core.tuning import plan_lines

    dense = TuningTable.from_dict(_table(_entry(backend="dense", us=5.0, us_dense=5.0),
                                         _entry(backend="dense", m_max=4096, us=50.0, us_dense=50.0)))
    lines = plan_lines(dense.plan_summary())
    assert lines[-1].strip().startswith("every layer runs the dense kernel") and "as tuned: 1.000x (" in lines[0]
    partial = TuningTable.from_dict(_table(_entry(us=5.0, us_dense=6.0), _entry(n=32, us=None, us_dense=7.0)))
    r = partial.plan_summary()[0]
    assert r["us"] is None and r["speedup"] is None and "not measured" in plan_lines([r])[0]
    assert partial.plan_summary({(64, 96, "int8"): 1})[0]["speedup"] == pytest.approx(6.0 / 5.0)  # n=32 not counted
