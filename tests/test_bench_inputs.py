"""`glm-image bench`'s input handling (issue 30): output paths checked before any work, malformed
`bench plan` reports refused in one line, and the speed table saying which options were on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from glm_image.cli import main


def never(*args, **kwargs):
    raise AssertionError("the benchmark ran although its output path could not be written")


@pytest.fixture
def no_runs(monkeypatch):
    """The benchmarks themselves fail the test if reached: every check must come before them."""
    import glm_image.bench.ar as ar
    import glm_image.bench.dit as dit
    import glm_image.bench.speed as speed

    monkeypatch.setattr(speed, "run_speed", never)
    monkeypatch.setattr(ar, "run_ar", never)
    monkeypatch.setattr(dit, "run_dit", never)


def bad_paths(tmp_path: Path) -> list[tuple[str, str]]:
    """(path, what the error says) for paths a report cannot be written to."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "a-folder").mkdir(exist_ok=True)
    return [
        (str(tmp_path / "a-folder"), "is a folder"),
        (str(tmp_path) + "/", "is a folder"),
        (str(a_file / "report.json"), "a-file"),
        (str(tmp_path / ("n" * 300 + ".json")), "longer than 255 bytes"),
        ("/dev/null", "not a regular file"),
        ("", "empty"),
    ]


@pytest.mark.parametrize("command", ["speed", "ar", "dit"])
def test_an_unwritable_out_fails_before_the_run(command, tmp_path, no_runs, capsys):
    for path, message in bad_paths(tmp_path):
        assert main(["bench", command, "--out", path]) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out" in err and message in err, err
        assert "Traceback" not in err


def test_an_unwritable_or_unknown_plot_fails_before_the_run(tmp_path, no_runs, capsys):
    pytest.importorskip("matplotlib")
    cases = [*bad_paths(tmp_path), (str(tmp_path / "speed.xyz"), "cannot write .xyz files")]
    for path, message in cases:
        assert main(["bench", "speed", "--plot", path]) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--plot" in err and message in err, err


def test_a_good_out_path_is_created_and_left_to_the_run(tmp_path, monkeypatch, capsys):
    """The check makes the folders and leaves no probe file behind; the run then writes there."""
    import glm_image.bench.dit as dit

    report = {"benchmark": "dit_step", "results": [], "config": {}, "notes": []}
    monkeypatch.setattr(dit, "run_dit", lambda options, progress: report)
    monkeypatch.setattr(dit, "format_dit", lambda r: "table")
    out = tmp_path / "new" / "deeper" / "dit.json"
    assert main(["bench", "dit", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == report
    assert sorted(os.listdir(out.parent)) == ["dit.json"]


def speed_report(**case_changes) -> dict:
    ours = {"ar_prefill_s": 0.1, "ar_decode_s": 0.9, "dit_s": 2.4, "vae_s": 0.6, "seconds_per_image": 4.0}
    case = {"size": "1024x1024", "batch": 1, "steps": 50, "ours": ours, **case_changes}
    return {"benchmark": "speed", "created": "2026-01-01T00:00:00", "config": {}, "results": [case]}


def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "the top level is list, not an object"),
        ("null", "the top level is null"),
        ('"speed"', 'the top level is "speed"'),
        ("3", "the top level is 3"),
        ('{"benchmark": "speed", "results": NaN}', "NaN is not a number JSON allows"),
        ('{"benchmark": "speed", "results": Infinity}', "Infinity is not a number JSON allows"),
        ('{"benchmark": "speed", "results": "x"}', 'results = "x"; expected a non-empty list'),
        ('{"benchmark": "speed", "results": []}', "results = list; expected a non-empty list"),
        ('{"benchmark": "speed", "results": [null]}', "results[0] = null; expected an object"),
        ('{"benchmark": "ar", "results": [{}]}', 'benchmark = "ar", not "speed"'),
        (json.dumps(speed_report(batch=0)), "results[0].batch = 0; expected an integer in 1..1000000"),
        (json.dumps(speed_report(batch=True)), "results[0].batch = true"),
        (json.dumps(speed_report(batch="2")), 'results[0].batch = "2"'),
        (json.dumps(speed_report(size=5)), "results[0].size = 5"),
        (json.dumps(speed_report(ours=None)), "results[0].ours = null"),
        (json.dumps(speed_report(ours={"ar_prefill_s": "1"})), 'results[0].ours.ar_prefill_s = "1"'),
        (json.dumps(speed_report(ours=[])), "results[0].ours = list"),
        (json.dumps(speed_report(steps=0)), "results[0].steps = 0"),
        ('{"benchmark": "speed", "results": [{"batch": 1' + "0" * 5000 + "}]}", "not valid JSON"),
        (deep(100_000), "nested too deeply"),
        ("{", "not JSON"),
    ],
)
def test_bench_plan_refuses_a_malformed_report_in_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "speed.json"
    path.write_text(text)
    assert main(["bench", "plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err, err
    assert "Traceback" not in err


def test_bench_plan_refuses_negative_huge_and_tiny_times(tmp_path, capsys):
    ours = {"ar_prefill_s": 0.1, "ar_decode_s": 0.9, "dit_s": 2.4, "vae_s": 0.6, "seconds_per_image": 4.0}
    for change, message in [
        ({"dit_s": -1}, "results[0].ours.dit_s = -1; expected seconds in 0..1e+09"),
        ({"vae_s": 1e300}, "results[0].ours.vae_s = 1e+300"),
        ({"ar_prefill_s": 5e-324, "ar_decode_s": 0.0}, "too small to be measurements"),
    ]:
        path = tmp_path / "speed.json"
        path.write_text(json.dumps(speed_report(ours={**ours, **change})))
        assert main(["bench", "plan", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_bench_plan_refuses_devices_fifos_folders_and_huge_files(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(17 * 2**20)  # sparse: 17 MiB of zeros
    cases = [
        ("/dev/zero", "not a regular file"),
        (str(tmp_path), "not a regular file"),
        (str(huge), "larger than 16 MiB"),
        (str(tmp_path / "missing.json"), "cannot read (No such file or directory)"),
    ]
    for path, message in cases:
        assert main(["bench", "plan", path]) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path in err and message in err, err
    # a FIFO: never opened for reading (that would wait for a writer forever)
    assert main(["bench", "plan", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_bench_plan_out_is_checked_before_reading(tmp_path, capsys):
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(speed_report()))
    assert main(["bench", "plan", str(path), "--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "plan.json"
    assert main(["bench", "plan", str(path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["batch"] == 1


def test_the_speed_table_names_the_options_that_were_on():
    from glm_image.bench.speed import format_speed

    def table(**config) -> str:
        base = {"model": "tiny", "dtype": "float32", "steps": 2, "repeats": 1, "warmup": 0}
        base |= {"compare_reference": False, "max_ar_tokens": None, "quantize": None}
        base |= {"ar_decoding": "sequential", "jacobi_window": None, "dit_cache": None}
        base |= {"parallel": {"ar_tp": 1, "dit_cfg_parallel": False, "dit_sp": 1, "placement": "same"}}
        report = {"config": base | config, "machine": {"device": "cpu"}, "results": [], "notes": []}
        return format_speed(report).splitlines()[1]

    assert table() == "ours: quantize none, decoding sequential, DiT cache off, one device"
    cache = {"threshold": 0.12, "warmup": 4, "max_consecutive": 3, "taylor": False}
    line = table(quantize="int8", ar_decoding="jacobi", jacobi_window=16, dit_cache=cache, max_ar_tokens=8)
    assert line.startswith("ours: quantize int8, decoding jacobi (window 16), DiT cache on (threshold 0.12")
    assert "AR stopped after 8 tokens" in line
    two = {"ar_tp": 2, "dit_cfg_parallel": False, "dit_sp": 1, "placement": "same"}
    assert "AR tensor parallel x2" in table(parallel=two)
