"""The `glm-image` command: info and make-checkpoint, and one-line errors instead of tracebacks."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glm_image.cli import main
from glm_image.hub import resolve_checkpoint
from glm_image.weights import WeightIndex

ROOT = Path(__file__).resolve().parent.parent


def _parameters_read_by_safetensors(folder: Path) -> int:
    """The count ``info`` should report, computed with safetensors itself (not our reader)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total


def test_info_reports_sizes_from_the_weight_headers(tiny_checkpoint, capsys):
    assert main(["info", "--model", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    for component in ("vision_language_encoder", "transformer", "text_encoder", "vae"):
        n = _parameters_read_by_safetensors(tiny_checkpoint / component)
        expected = f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.2f}K"  # the tiny model's range
        line = next(line for line in out.splitlines() if line.startswith(component))
        assert expected in line and "F32" in line
    assert "2 layers, hidden 128" in out and "M-RoPE [2, 3, 3]" in out
    assert "shards + index" in out
    assert "Runtime          device cpu, dtype float32; attention: sdpa" in out


def test_info_on_the_released_preset_counts_on_meta(capsys):
    assert main(["info", "--preset", "glm-image"]) == 0
    out = capsys.readouterr().out
    for size in ("10.11B", "8.91B", "6.93B", "217.66M", "406.10M"):
        assert size in out
    assert "40 layers, hidden 4096, FFN 13696, heads 32 (KV 2) x 128" in out


def test_info_shows_config_keys_the_engine_does_not_read(tiny_copy, capsys):
    import json

    path = tiny_copy / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["rope_scaling_future"] = {"type": "yarn"}
    path.write_text(json.dumps(config))
    assert main(["info", "--model", str(tiny_copy)]) == 0
    out = capsys.readouterr().out
    assert "Config keys this engine does not know" in out
    assert f"  {path}: rope_scaling_future" in out


def test_tiny_is_built_once_and_cached(capsys):
    first = resolve_checkpoint("tiny")
    assert first.is_relative_to(Path(os.environ["GLM_IMAGE_CACHE"]))
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert resolve_checkpoint("tiny") == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    assert main(["info", "--model", "tiny"]) == 0
    assert str(first) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "/nonexistent/glm-image",
            "not found; allowed: tiny, wide, glm-image-random, a local checkpoint folder",
        ),
        ("zai-org/GLM-Image", "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"),
        ("./not/a/hub/id", "not found"),
    ],
)
def test_bad_model_is_one_line_with_exit_status_2(model, message, capsys):
    assert main(["info", "--model", model]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_hub_error_says_how_to_pass_a_local_path(capsys):
    main(["info", "--model", "zai-org/GLM-Image"])
    assert "--model /path/to/GLM-Image" in capsys.readouterr().err


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_corrupt_weights_are_reported_not_hidden(tiny_copy, capsys):
    path = tiny_copy / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["info", "--model", str(tiny_copy)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "truncated" in err


def test_script_and_console_entry_point(tmp_path, tiny_checkpoint):
    out = tmp_path / "made"
    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(out), "--seed", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert script.returncode == 0, script.stderr
    made = WeightIndex.from_folder(out / "transformer").tensors
    assert made.keys() == WeightIndex.from_folder(tiny_checkpoint / "transformer").tensors.keys()

    exe = shutil.which("glm-image")
    assert exe, "the console script `glm-image` is not installed"
    again = subprocess.run([exe, "make-checkpoint", str(out)], capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_info_check_backend_prints_the_self_check_table(tiny_checkpoint, capsys):
    """On a CPU the reference backend has nothing to check; Triton's interpreter (set by the test
    session) runs every kernel against its twin and prints one row per op."""
    args = ["info", "--model", str(tiny_checkpoint), "--check-backend", "--device", "cpu"]
    assert main(args) == 0
    assert "nothing to check: the sdpa backend is the reference" in capsys.readouterr().out
    assert main([*args, "--attention-backend", "triton"]) == 0
    out = capsys.readouterr().out
    for op in (
        "decode_attention",
        "rms_norm",
        "add_rms_norm",
        "layer_norm_modulate",
        "rotary_",
        "qk_norm_rope",
    ):
        assert any(line.startswith(op) and " ok " in line for line in out.splitlines()), op
