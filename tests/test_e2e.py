"""The end-to-end benchmark driver: variant parsing, the vllm command line, and the report."""

import json

import pytest

from slidesparse.bench import e2e


def test_parse_variant_with_extra_args(tmp_path):
    v = e2e.parse_variant(f"fp8 dense={tmp_path}::--quantization fp8 --compilation-config '{{\"a\": [1, 2]}}'")
    assert v.name == "fp8 dense" and v.model == str(tmp_path)
    assert v.extra == ("--quantization", "fp8", "--compilation-config", '{"a": [1, 2]}')


@pytest.mark.parametrize("spec", ["no-equals-sign", "x=/definitely/not/here"])
def test_parse_variant_rejects_bad_input(spec):
    with pytest.raises(ValueError):
        e2e.parse_variant(spec)


def test_command_uses_random_dataset_lengths(tmp_path):
    v = e2e.Variant("a", str(tmp_path), ("--enforce-eager",))
    cmd = e2e.command(v, "prefill", "/tmp/r.json", vllm="vllm")
    w = e2e.WORKLOADS["prefill"]
    # the random dataset ignores --input-len; its own flags must carry the lengths
    assert cmd[cmd.index("--random-input-len") + 1] == str(w["input_len"])
    assert cmd[cmd.index("--random-output-len") + 1] == str(w["output_len"])
    assert "--input-len" not in cmd and cmd[-1] == "--enforce-eager"


def test_report_is_relative_to_the_first_successful_variant(tmp_path):
    rows = [
        {"variant": "base", "workload": "prefill", "ok": True, "value": 200.0},
        {"variant": "fast", "workload": "prefill", "ok": True, "value": 300.0},
        {"variant": "broken", "workload": "prefill", "ok": False, "error": "boom"},
    ]
    report = {"title": "t", "gpu": None, "versions": {}, "argv": "x",
              "workloads": {"prefill": e2e.WORKLOADS["prefill"]}, "results": rows}
    md = e2e.markdown(report)
    assert "| fast | 300 | 1.500x |" in md and "| base | 200 | 1.000x |" in md
    assert "failed: boom" in md
    pytest.importorskip("matplotlib")
    e2e.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    json.dumps(report)  # the report must stay JSON-serialisable
