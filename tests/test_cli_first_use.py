"""The `glm-image generate` command as a newcomer meets it (issue 30): hostile arguments are one
line and exit 2 before the model loads, messages name the flags typed, `-v` goes anywhere,
`--help` shows the defaults, condition images of another size can be fitted, an idle step cache
is reported, and the AR progress bar stops when its stage does."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glm_image.cli import build_parser, main
from glm_image.config import SizeLimits
from glm_image.engine.choices import StepCacheOptions
from glm_image.errors import GlmImageError
from glm_image.options import RUNTIME_FLAGS, as_flags
from glm_image.progress import StageBars
from glm_image.request import MAX_IMAGES_PER_PROMPT
from glm_image.validation import (
    IdleCacheWarning,
    fitted_size,
    idle_step_cache,
    load_condition_images,
    open_condition_image,
)

TINY = SizeLimits(64, 1024, 32)
RELEASED = SizeLimits(512, 2048, 32)


def fails_before_loading(capsys, *args: str) -> str:
    """Run `glm-image generate ARGS` in this process; it must exit 2 with one line (no model is
    loaded: a checkpoint folder without weights would fail differently, later)."""
    code = main(["generate", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def configs_only(tiny_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint's configs without weights: loading the model would fail."""
    import shutil

    out = tmp_path / "configs-only"
    shutil.copytree(tiny_checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    return out


# ------------------------------------------------------------------ 1. tracebacks -> one line


def test_an_output_name_over_255_bytes_is_one_line(configs_only, tmp_path, capsys):
    name = "a" * 300 + ".png"
    err = fails_before_loading(capsys, "p", "--model", str(configs_only), "-o", str(tmp_path / name))
    assert "a name of 304 bytes; allowed: at most 255 bytes a name" in err


def test_an_output_path_over_path_max_is_one_line(configs_only, tmp_path, capsys):
    deep = Path(tmp_path, *["b" * 200] * 25, "x.png")  # 5000+ bytes, every name short enough
    err = fails_before_loading(capsys, "p", "--model", str(configs_only), "-o", str(deep))
    assert f"a path of {len(os.fsencode(deep))} bytes; allowed: at most" in err


def test_numbered_outputs_are_checked_too(configs_only, tmp_path, capsys):
    """-o fits in 255 bytes, its numbered siblings ("-1", "-2") do not."""
    name = "c" * 251 + ".png"
    args = ("p", "--model", str(configs_only), "--num-images", "2", "-o", str(tmp_path / name))
    assert "a name of 257 bytes" in fails_before_loading(capsys, *args)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[" * 100_000, "line 1: nested too deeply"),
        ('{"prompt": "a", "seed": [' + "[" * 100_000 + "]}", "line 1: nested too deeply"),
        ('{"prompt": "a", "seed": ' + "7" * 5000 + "}", "line 1: a number with too many digits"),
        ('{"prompt": "a", "steps": -' + "7" * 5000 + "}", "line 1: a number with too many digits"),
    ],
)
def test_hostile_prompt_lines_are_one_line(configs_only, tmp_path, capsys, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line + "\n")
    err = fails_before_loading(capsys, "--prompts", str(prompts), "--model", str(configs_only))
    assert message in err


def test_a_deep_but_parsable_value_is_shown_short(configs_only, tmp_path, capsys):
    """Nested just below the recursion limit: it parses, and the message must not repr it whole."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "steps": ' + "[" * 900 + "]" * 900 + "}\n")
    err = fails_before_loading(capsys, "--prompts", str(prompts), "--model", str(configs_only))
    assert "line 1: steps = [[[" in err and "(1800 characters)" in err


@pytest.mark.parametrize("count", ["100000", "0", str(MAX_IMAGES_PER_PROMPT + 1)])
def test_num_images_is_capped_before_loading(configs_only, tmp_path, capsys, count):
    args = ("p", "--model", str(configs_only), "--num-images", count, "-o", str(tmp_path / "x.png"))
    err = fails_before_loading(capsys, *args)
    assert f"--num-images {count}; allowed: an integer in 1..{MAX_IMAGES_PER_PROMPT}" in err


def test_num_images_cap_in_the_api(glm):
    with pytest.raises(
        GlmImageError, match=f"num_images_per_prompt = 33; allowed: an integer in 1..{MAX_IMAGES_PER_PROMPT}"
    ):
        glm.generate("p", 64, 64, num_inference_steps=1, num_images_per_prompt=33)


def test_a_fifo_as_image_is_refused_without_opening_it(configs_only, tmp_path):
    """Opening a FIFO waits for a writer: the command would hang. It must answer at once."""
    import subprocess
    import sys

    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    args = ["p", "--image", str(fifo), "--model", str(configs_only), "-o", str(tmp_path / "x.png")]
    command = [sys.executable, "-m", "glm_image.cli", "generate", *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2 and f"--image {fifo}: a FIFO; allowed: an image file" in run.stderr
    with pytest.raises(GlmImageError, match=r"images\[0\]: a folder"):
        load_condition_images([str(tmp_path)], 1, TINY)


# ------------------------------------------------------------------ 2. messages name the flags


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps 0; allowed: an integer >= 1"),
        (["--guidance", "0.5"], "--guidance 0.5; allowed: a number in 1..20"),
        (["--size", "64x2048"], "--size 64x2048: height 2048 is not allowed; allowed: 64..1024"),
        (["--seed", "-1"], "--seed -1; allowed: 0..9223372036854775807"),
        (["--image", "nosuch.png"], "--image nosuch.png: not a readable image (no such file)"),
        (["--device", "tpu"], "--device 'tpu' is not supported; allowed: cpu, cuda, npu"),
        (
            ["--dit-cache", "fbcache", "--dit-cache-warmup", "-1"],
            "--dit-cache-warmup -1; allowed: an integer >= 0",
        ),
        (["--quantize", "int5"], "--quantize 'int5' is not known"),
    ],
)
def test_messages_name_the_flag(configs_only, tmp_path, capsys, args, message):
    err = fails_before_loading(
        capsys, "p", *args, "--model", str(configs_only), "-o", str(tmp_path / "x.png")
    )
    assert message in err
    for python_name in ("num_inference_steps", "guidance_scale", "images[", "height =", "device ="):
        assert python_name not in err


def test_a_prompts_line_names_its_keys_and_the_flags_it_took(configs_only, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 0}\n')
    err = fails_before_loading(capsys, "--prompts", str(prompts), "--model", str(configs_only))
    assert "line 2: steps = 0; allowed" in err  # the line's key
    prompts.write_text('{"prompt": "a", "steps": 2}\n')
    err = fails_before_loading(
        capsys, "--prompts", str(prompts), "--guidance", "30", "--model", str(configs_only)
    )
    assert "line 1: --guidance 30.0; allowed" in err  # the flag it took its value from


def test_the_api_keeps_the_python_names(glm):
    with pytest.raises(GlmImageError, match=r"^num_inference_steps = 0"):
        glm.generate("p", 64, 64, num_inference_steps=0)
    with pytest.raises(GlmImageError, match=r"^images\[0\]: not a readable image"):
        glm.generate("p", 64, 64, num_inference_steps=1, images=["/nonexistent.png"])


def test_as_flags_translates_only_the_field_it_starts_with():
    names = {"num_inference_steps": "--steps", "seed": "steps-key"} | RUNTIME_FLAGS
    assert as_flags("num_inference_steps = 0; allowed", names) == "--steps 0; allowed"
    assert as_flags("seed = 3; x", names) == "steps-key = 3; x"  # a key keeps its " = "
    assert as_flags("seeds = 3", names) == "seeds = 3"  # a longer word is another field
    assert as_flags("dit_cache warmup = 2", names) == "--dit-cache-warmup 2"
    assert as_flags("a message about device = 1", names) == "a message about device = 1"


# ------------------------------------------------------------------ 3. -v anywhere, --help defaults


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "generate", "p"],
        ["generate", "p", "-v"],
        ["generate", "-v", "p"],
        ["info", "--verbose"],
        ["serve", "-v"],
        ["bench", "plan", "report.json", "-v"],
    ],
)
def test_verbose_goes_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).verbose is True


def test_without_verbose_it_is_off():
    assert build_parser().parse_args(["generate", "p"]).verbose is False


def test_generate_help_shows_the_defaults(cli):
    run = cli("generate", "--help")
    text = " ".join(run.stdout.split())  # argparse wraps lines
    assert run.returncode == 0
    for expected in (
        "(default: tiny",
        "512..2048 for the released model, 64..1024 for tiny (default 1024x1024)",
        "denoising steps (default 50)",
        "(default 1.5)",
        f"(default 1, at most {MAX_IMAGES_PER_PROMPT})",
        "--attention-backend",
        "(default: auto)",
        "--fit-image",
        "-v, --verbose",
    ):
        assert expected in text, expected


def test_list_defaults_show_as_typed(cli):
    run = cli("bench", "ar", "--help")
    text = " ".join(run.stdout.split())
    assert "e.g. last,above (default: last)" in text and "('" not in text
    assert build_parser().parse_args(["bench", "ar"]).jacobi_drafts == ("last",)  # the value is untouched


# ------------------------------------------------------------------ 4. condition images of another size


@pytest.mark.parametrize(
    ("size", "limits", "expected"),
    [
        ((96, 128), TINY, (96, 128)),  # allowed: unchanged
        ((100, 130), TINY, (96, 128)),  # the nearest multiples
        ((40, 40), TINY, (64, 64)),  # scaled up to the minimum
        ((3000, 2000), TINY, (1024, 672)),  # scaled down to the maximum, aspect kept
        ((600, 100), TINY, (384, 96)),  # 6:1 cropped to 4:1 (416x96 would be past it)
        ((4000, 3000), RELEASED, (2048, 1536)),
        ((300, 300), RELEASED, (512, 512)),
        ((1000, 100), RELEASED, (2048, 512)),
    ],
)
def test_fitted_size(size, limits, expected):
    w, h = fitted_size(*size, limits)
    assert (w, h) == expected
    limits.check_size(h, w)
    assert max(w, h) <= 4 * min(w, h)


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_the_size_error_names_the_nearest_size_and_the_option():
    with pytest.raises(
        GlmImageError,
        match=r"images\[0\] width = 100 is not allowed.*nearest allowed size is 96x128; fit_images=True",
    ):
        open_condition_image(io.BytesIO(_png(100, 130)), "images[0]", TINY)
    with pytest.raises(
        GlmImageError, match="aspect ratio 640x96; allowed: at most 4:1; the nearest allowed size is 384x96"
    ):
        open_condition_image(io.BytesIO(_png(640, 96)), "images[0]", TINY)


def test_fit_resizes_to_the_nearest_size_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="glm_image.validation"):
        image = open_condition_image(io.BytesIO(_png(100, 130)), "images[0]", TINY, fit=True)
    assert image.size == (96, 128) and image.mode == "RGB"
    assert image.getpixel((48, 64)) == (200, 30, 30)
    assert "images[0]: 100x130 is not an allowed size; resized and centre-cropped to 96x128" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="glm_image.validation"):
        same = open_condition_image(io.BytesIO(_png(96, 128)), "images[0]", TINY, fit=True)
    assert same.size == (96, 128) and caplog.text == ""  # an allowed size is never touched


def test_the_cli_error_points_at_fit_image(configs_only, tmp_path, capsys):
    (tmp_path / "odd.png").write_bytes(_png(100, 130))
    args = (
        "p",
        "--image",
        str(tmp_path / "odd.png"),
        "--model",
        str(configs_only),
        "-o",
        str(tmp_path / "x.png"),
    )
    err = fails_before_loading(capsys, *args)
    assert "the nearest allowed size is 96x128; --fit-image crops and resizes to it" in err


def test_fit_image_generates_from_an_odd_sized_image(tiny_checkpoint, tmp_path, cli):
    (tmp_path / "odd.png").write_bytes(_png(100, 130))
    out = tmp_path / "out.png"
    common = [
        "--model",
        str(tiny_checkpoint),
        "--size",
        "64x64",
        "--steps",
        "1",
        "--seed",
        "2",
        "-o",
        str(out),
    ]
    run = cli("generate", "make it 'RED'", "--image", str(tmp_path / "odd.png"), "--fit-image", *common)
    assert run.returncode == 0, run.stderr
    assert "100x130 is not an allowed size; resized and centre-cropped to 96x128" in run.stderr
    assert Image.open(out).size == (64, 64)


def test_the_api_fits_with_fit_images(glm):
    odd = Image.new("RGB", (100, 130), (10, 200, 10))
    out = glm.generate("'G'", 64, 64, num_inference_steps=1, seed=1, images=[odd], fit_images=True)
    fitted = glm.generate("'G'", 64, 64, num_inference_steps=1, seed=1, images=[odd.resize((96, 128))])
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(fitted.images[0]))  # one colour: one fit
    with pytest.raises(GlmImageError, match="fit_images=True crops and resizes"):
        glm.generate("'G'", 64, 64, num_inference_steps=1, seed=1, images=[odd])


# ------------------------------------------------------------------ 5. an idle step cache is reported


def test_idle_step_cache():
    assert idle_step_cache(None, 2) is None
    assert idle_step_cache(StepCacheOptions(warmup=4), 5) is None
    assert idle_step_cache(StepCacheOptions(warmup=4), 4).startswith(
        "dit_cache warmup = 4 covers all 4 steps"
    )
    assert "max_consecutive = 0" in idle_step_cache(StepCacheOptions(max_consecutive=0), 50)
    assert idle_step_cache(StepCacheOptions(threshold=0.0), 50) is None  # 0: the documented "off"


def test_the_api_warns_when_the_cache_caches_nothing(glm):
    with pytest.warns(IdleCacheWarning, match="dit_cache warmup = 4 covers all 2 steps"):
        glm.generate("p", 64, 64, num_inference_steps=2, seed=1, dit_cache=StepCacheOptions())
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdleCacheWarning)
        glm.generate("p", 64, 64, num_inference_steps=2, seed=1, dit_cache=StepCacheOptions(warmup=1))


def test_the_cli_warns_once_with_the_flags(tiny_checkpoint, tmp_path, cli):
    common = [
        "--model",
        str(tiny_checkpoint),
        "--size",
        "64x64",
        "--seed",
        "1",
        "-o",
        str(tmp_path / "x.png"),
    ]
    run = cli("generate", "p", "--steps", "3", "--dit-cache", "fbcache", *common)
    assert run.returncode == 0, run.stderr
    assert "IdleCacheWarning" not in run.stderr  # the pipeline's own, in Python names: not twice
    warning = [line for line in run.stderr.splitlines() if line.startswith("glm-image: warning")]
    assert warning == [
        "glm-image: warning: --dit-cache fbcache: --dit-cache-warmup 4 covers all 3 steps, so no step is "
        "cached: the step cache changes nothing; allowed to cache: a warm-up below the steps"
    ]
    quiet = cli("generate", "p", "--steps", "3", "--dit-cache", "fbcache", "--dit-cache-warmup", "1", *common)
    assert quiet.returncode == 0 and "glm-image: warning" not in quiet.stderr


# ------------------------------------------------------------------ 6. the AR bar stops with its stage


def test_a_stage_bar_closes_when_its_stage_ends():
    bars = StageBars(file=io.StringIO())
    bars("ar", 3, 10)
    ar = bars.open["ar"]
    bars("dit", 1, 4)  # the AR stage stopped short of its total (e.g. every row hit EOS)
    assert list(bars.open) == ["dit"] and ar.disable  # closed: tqdm's clock stopped
    bars("ar", 10, 10)  # a late report of a finished stage reopens nothing
    assert list(bars.open) == ["dit"]
    bars("dit", 4, 4)
    assert bars.open == {}


def test_a_stage_bar_closes_at_its_total():
    bars = StageBars(file=io.StringIO())
    bars("ar", 5, 5)
    assert bars.open == {}
