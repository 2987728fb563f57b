"""`glm-image bench speed|quality|ar|dit` end to end on the tiny model.

Numbers are never asserted (timings on a shared CPU are noise); the report layout, the token
counts and what each engine ran are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from glm_image.cli import main

ENGINE_KEYS = {
    "seconds",
    "ar_tokens",
    "ar_sequences",
    "images",
    "ar_prefill_s",
    "ar_decode_s",
    "ar_tokens_per_s",
    "ar_weight_gb_per_s",
    "dit_s",
    "dit_s_per_step",
    "dit_tflop_per_s",
    "vae_s",
    "total_s",
    "seconds_per_image",
    "peak_memory_bytes",
    "peak_memory_increase_bytes",
    "weight_bytes",
    "fraction_of_floor",
}


def _common_layout(report: dict, benchmark: str) -> None:
    assert report["schema"] == "glm-image-bench/1" and report["benchmark"] == benchmark
    assert {"created", "machine", "config", "results", "notes"} <= set(report)
    assert {"device", "threads", "torch", "python"} <= set(report["machine"])


def test_speed_against_the_reference(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["bench", "speed", "--model", str(tiny_checkpoint), "--compare-reference", "--sizes", "64x64"]
    assert main([*argv, "--steps", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| size | batch | engine |" in table and "| 64x64 | 1 | ours/ref |" in table
    report = json.loads(out.read_text())
    _common_layout(report, "speed")
    assert report["config"]["steps"] == 2 and report["config"]["compare_reference"] is True
    (case,) = report["results"]
    assert (case["size"], case["batch"], case["device"], case["dtype"]) == ("64x64", 1, "cpu", "float32")
    ours, reference = case["ours"], case["reference"]
    assert set(ours) == ENGINE_KEYS | {"ar_forwards_per_image"}
    assert set(reference) == ENGINE_KEYS | {"dit_forwards"}
    # 64x64: a 16x16 preview + a 2x2 target grid; the reference also runs its EOS step
    assert ours["ar_tokens"] == 260 and reference["ar_tokens"] == 261
    assert ours["ar_forwards_per_image"] == 260  # sequential: one forward per token
    assert reference["dit_forwards"] == 2 * 2  # two CFG branches per step
    assert all(len(v) == 1 for v in ours["seconds"].values())
    assert ours["peak_memory_bytes"] > 0 and ours["weight_bytes"] > 0
    assert set(case["ratio"]) == {
        "ar_prefill_s",
        "ar_tokens_per_s",
        "dit_s_per_step",
        "vae_s",
        "seconds_per_image",
        "peak_memory_bytes",
        "speedup",
    }
    assert case["floor"]["device"] is None and "GPUs and NPUs only" in case["floor"]["reason"]
    assert ours["fraction_of_floor"] == {"ar_decode": None, "dit": None}
    assert case["ar_weight_bytes_per_token"] > 0 and case["dit_flops_per_step"] > 0


def test_speed_capped_batched_and_alternating(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = [
        "bench",
        "speed",
        "--model",
        str(tiny_checkpoint),
        "--compare-reference",
        "--sizes",
        "64x64,96x64",
    ]
    argv += ["--steps", "1", "--batch", "2", "--repeats", "2", "--max-ar-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [c["size"] for c in report["results"]] == ["64x64", "96x64"]
    for case in report["results"]:
        ours, reference = case["ours"], case["reference"]
        assert ours["ar_tokens"] == reference["ar_tokens"] == 8
        assert (ours["ar_sequences"], reference["ar_sequences"]) == (2, 1)  # one sequence per prompt there
        assert ours["images"] == reference["images"] == 2
        assert len(ours["seconds"]["total"]) == 2 and ours["seconds_per_image"] == pytest.approx(
            ours["total_s"] / 2, rel=1e-3
        )
    notes = " ".join(report["notes"])
    assert "--max-ar-tokens 8" in notes and "num_images_per_prompt" in notes
    assert "--max-ar-tokens 8" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "100x64"], "width = 100 is not allowed"),
        (["--steps", "0"], "--steps = 0"),
        (["--batch", "0"], "--batch = 0"),
        (["--max-ar-tokens", "0"], "--max-ar-tokens = 0"),
    ],
)
def test_speed_bad_options_exit_2(tiny_checkpoint, args, message, capsys):
    assert main(["bench", "speed", "--model", str(tiny_checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_plot_without_matplotlib_fails_before_measuring(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["bench", "speed", "--model", str(tiny_checkpoint), "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 2
    assert "pip install 'glm-image[plot]'" in capsys.readouterr().err


def test_plot_draws_every_case(tmp_path):
    pytest.importorskip("matplotlib")
    from glm_image.bench.plot import plot_speed

    engine = {"ar_prefill_s": 0.1, "ar_decode_s": 1.0, "dit_s": 2.0, "vae_s": 0.3}
    case = {"size": "64x64", "batch": 1, "steps": 2, "ours": engine, "reference": dict(engine, dit_s=3.0)}
    report = {
        "results": [case, dict(case, batch=2, reference=None)],
        "config": {"model": "tiny", "dtype": "float32"},
        "machine": {"device": "cpu"},
    }
    path = plot_speed(report, tmp_path / "plots" / "speed.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_on_the_tiny_model(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("rapidocr")
    out, images = tmp_path / "quality.json", tmp_path / "images"
    argv = ["bench", "quality", "--model", str(tiny_checkpoint), "--limit", "2", "--size", "64x64"]
    assert main([*argv, "--steps", "1", "--out", str(out), "--save-images", str(images)]) == 0
    table = capsys.readouterr().out
    assert "| engine | suite | lang |" in table and "RapidOCR" in table and "PaddleOCR" in table
    report = json.loads(out.read_text())
    _common_layout(report, "quality")
    assert report["ocr"]["package"].startswith("rapidocr ") and report["ocr"]["models"]["rec"].endswith(
        ".onnx"
    )
    assert [(r["engine"], r["suite"], r["lang"], r["images"]) for r in report["results"]] == [
        ("ours", "cvtg", "en", 1),
        ("ours", "cvtg", "zh", 1),
        ("ours", "cvtg", "all", 2),
    ]
    assert all({"word_accuracy", "ned", "words", "correct_words"} <= set(r) for r in report["results"])
    assert len(report["samples"]) == 2
    for sample in report["samples"]:
        assert {"id", "prompt", "targets", "engine", "seed", "seconds", "ocr", "word_accuracy", "ned"} <= set(
            sample
        )
        assert Path(sample["image"]).is_file()


def test_quality_longtext_scores_text(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("rapidocr")
    from glm_image.bench.quality import QualityOptions, format_quality, run_quality

    report = run_quality(
        QualityOptions(suite="longtext", limit=1, model=str(tiny_checkpoint), size=(64, 64), steps=1)
    )
    (result,) = report["results"]
    assert (result["suite"], result["lang"]) == ("longtext", "en") and result["total"] > 20
    assert "LongText score" in format_quality(report)


def test_quality_goes_on_when_the_reference_fails_on_a_prompt(tiny_checkpoint, monkeypatch):
    pytest.importorskip("rapidocr")
    from glm_image.bench import engines
    from glm_image.bench.quality import QualityOptions, run_quality
    from glm_image.errors import GlmImageError

    def fail(*args, **kwargs):
        raise GlmImageError("the reference GlmImagePipeline failed")

    monkeypatch.setattr(engines.ReferenceRunner, "run", fail)
    report = run_quality(
        QualityOptions(limit=1, model=str(tiny_checkpoint), size=(64, 64), steps=1, compare_reference=True)
    )
    ours, reference = report["results"]
    assert (ours["engine"], ours["failed"]) == ("ours", 0)
    assert (reference["engine"], reference["failed"], reference["correct_words"]) == ("reference", 1, 0)
    assert "failed" in report["samples"][1]["error"] and report["samples"][1]["ocr"] == []
    assert any("scored as an image showing no text" in note for note in report["notes"])


def test_quality_without_an_ocr_package_names_the_extra(monkeypatch):
    from glm_image.bench.ocr import RapidOcr
    from glm_image.errors import GlmImageError

    monkeypatch.setitem(sys.modules, "rapidocr", None)
    with pytest.raises(GlmImageError, match=r"pip install 'glm-image\[eval\]'"):
        RapidOcr()


def test_bench_ar_and_dit_write_the_shared_layout(tiny_checkpoint, tmp_path, capsys):
    common = ["--model", str(tiny_checkpoint), "--size", "64x64", "--repeats", "1", "--device", "cpu"]
    decoders = ["--ar-decoding", "sequential,jacobi", "--jacobi-window", "2,4", "--images", "2"]
    assert (
        main(["bench", "ar", *common, "--max-tokens", "8", *decoders, "--out", str(tmp_path / "a.json")]) == 0
    )
    ar = json.loads((tmp_path / "a.json").read_text())
    _common_layout(ar, "ar_decode")
    rows = {r["decoder"]: r for r in ar["results"]}
    assert list(rows) == ["reference", "sequential", "jacobi W=2", "jacobi W=4"]
    assert all(r["new_tokens"] == 8 and r["weight_bytes_per_token"] > 0 for r in rows.values())
    # sequential decoding and the reference make one forward per token, the prefill's included
    assert rows["sequential"]["forwards_per_image"] == rows["reference"]["forwards_per_image"] == 8
    assert rows["sequential"]["forwards_vs_sequential"] == 1 and rows["sequential"]["images"] == 2
    assert all(1 <= rows[f"jacobi W={w}"]["forwards_per_image"] <= 8 for w in (2, 4))
    assert main(["bench", "dit", *common, "--out", str(tmp_path / "d.json")]) == 0
    dit = json.loads((tmp_path / "d.json").read_text())
    _common_layout(dit, "dit_step")
    assert dit["results"][0]["image_tokens"] == 16
    out = capsys.readouterr().out
    assert "| model | size | mode | T | decoder |" in out and "| model | size | image tokens |" in out
