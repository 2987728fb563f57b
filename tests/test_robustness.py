"""Bad input hurts no one else and nothing is left half-written (issue 13): the checks behind
the API, and `glm-image generate` as a user runs it.

The CLI cases run the installed command. Input checks run against a checkpoint folder that holds
the configs but no weights: a check that comes before the model loads names the input; one that
came after would name the missing weights instead.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glm_image.errors import GlmImageError

# ---------------------------------------------------------------------------------------- helpers


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit grey pixels but holds no pixel data: Pillow
    opens it (the header is valid) and fails only if something tries to decode it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def exif_rotated(upright: Image.Image) -> bytes:
    """``upright`` stored a quarter turn back, with EXIF orientation 6 ("turn 90 degrees clockwise
    to display"), as phones save portrait photos."""
    from PIL.Image import Exif

    exif = Exif()
    exif[0x0112] = 6
    return png_bytes(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)


def sixteen_bit_grey(width: int = 64, height: int = 64) -> np.ndarray:
    """(H, W) uint16 covering 0..65535 end to end, shuffled so the image is not a smooth ramp."""
    values = np.linspace(0, 65535, width * height).round().astype(np.uint16)
    return np.random.default_rng(1).permutation(values).reshape(height, width)


def eight_bit_of(values: np.ndarray) -> np.ndarray:
    """The 8-bit grey of 16-bit values, computed independently: round(v / 257)."""
    return np.round(values.astype(np.float64) / 257).astype(np.uint8)


# ---------------------------------------------------------------------------------------- prompt text


def test_plain_text_leaves_no_control_string_and_changes_nothing_else(glm):
    from glm_image.validation import WORD_JOINER, control_strings, plain_text

    for tokenizer in (glm.ar.processor.tokenizer, glm.dit.glyph.tokenizer):
        controls = control_strings(tokenizer)
        assert "<|image|>" in controls or "</s>" in controls
        for control in controls:
            for text in (control, f"a {control} b", control * 3, f"<{control}]", control[:-1] + control):
                broken = plain_text(text, controls)
                assert not any(c in broken for c in controls), (text, broken)
                assert broken.replace(WORD_JOINER, "") == text
    prompt = "A sign that says 'OPEN' <| not a token |> [MASKED]"
    assert plain_text(prompt, control_strings(glm.ar.processor.tokenizer)) is prompt


def test_special_token_strings_reach_the_ar_model_as_text(glm):
    """The reference tokenizes '<|image|>' in a prompt as the image token; we tokenize the text."""
    from glm_image.validation import control_strings, plain_text

    tokenizer = glm.ar.processor.tokenizer
    controls = control_strings(tokenizer)
    special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    assert len(tokenizer.encode("x", add_special_tokens=False)) == 1
    suffix = glm.ar.processor_inputs("x", 64, 64)["input_ids"][0].tolist()[1:]  # the grids and BOS
    for control in controls:
        assert (
            tokenizer.encode(control, add_special_tokens=False)[0] in special_ids
        )  # the reference's reading
        text = plain_text(f"a {control} b", controls)
        ids = glm.ar.processor_inputs(text, 64, 64)["input_ids"][0].tolist()
        assert ids[-len(suffix) :] == suffix
        prompt_ids = ids[: -len(suffix)]
        assert not special_ids & set(prompt_ids) and tokenizer.decode(prompt_ids) == text


def test_special_token_strings_reach_the_glyph_encoder_as_bytes(glm):
    from glm_image.validation import control_strings, plain_text

    tokenizer = glm.dit.glyph.tokenizer
    for control in ("</s>", "<pad>", "<unk>", "<extra_id_0>"):
        text = plain_text(control, control_strings(tokenizer))
        ids = tokenizer(text).input_ids
        assert (
            ids[:-1] == [b + 3 for b in text.encode()] and ids[-1] == tokenizer.eos_token_id
        )  # ByT5: byte + 3


# ---------------------------------------------------------------------------------------- non-finite results


def test_nan_latents_raise_before_the_vae_runs(glm, monkeypatch):
    from glm_image.errors import NonFiniteError

    denoise, decoded = glm.dit.denoise, []

    def nan_in_row_1(*args, **kwargs):
        latents = denoise(*args, **kwargs).clone()  # an inference tensor: copy to write it
        latents[1] = float("nan")
        return latents

    monkeypatch.setattr(glm.dit, "denoise", nan_in_row_1)
    monkeypatch.setattr(glm.dit, "decode", lambda latents: decoded.append(latents))
    with pytest.raises(NonFiniteError, match=r"latents: NaN or Inf in 1 of 2 images \(seeds \[8\]\)"):
        glm.generate(["a", "b"], 64, 64, num_inference_steps=1, seed=7)
    assert decoded == []  # nothing reached the VAE, so no black image exists


def test_check_finite_names_every_bad_row():
    from glm_image.errors import NonFiniteError, check_finite

    values = torch.zeros(4, 2, 3)
    check_finite(values, "pixels")
    values[0, 1, 2], values[3, 0, 0] = float("inf"), float("-inf")
    with pytest.raises(NonFiniteError, match=r"pixels: NaN or Inf in 2 of 4 images \(rows \[0, 3\]\)"):
        check_finite(values, "pixels")


# ---------------------------------------------------------------------------------------- sizes, images


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64x96", (64, 96)), ("64X96", (64, 96)), (" 64x96 ", (64, 96)), ("0064x96", (64, 96))],
)
def test_sizes_accepted(text, expected):
    from glm_image.request import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "２５６x256",
        "2_56x256",
        "+256x+256",
        "64 x 64",
        "-64x64",
        "64x64x64",
        "64",
        "\t64x64",
        "6\u200b4x64",
        "x",
        "",
    ],
)
def test_sizes_refused(text):
    from glm_image.request import parse_size

    with pytest.raises(GlmImageError, match="expected WIDTHxHEIGHT in ASCII digits"):
        parse_size(text)


def test_sixteen_bit_grey_maps_its_whole_range_to_eight_bits():
    from glm_image.validation import to_rgb

    values = sixteen_bit_grey()
    expected = eight_bit_of(values)
    assert expected.min() == 0 and expected.max() == 255
    for image in (
        (Image.open(io.BytesIO(png_bytes(Image.fromarray(values))))),
        Image.fromarray(values.astype(np.int32)),
    ):
        assert image.mode in ("I;16", "I")
        rgb = np.asarray(to_rgb(image))
        assert rgb.shape == (64, 64, 3) and (rgb == expected[..., None]).all()


def test_exif_orientation_is_applied_once(glm):
    from glm_image.validation import open_condition_image

    upright = noise(64, 96)
    opened = open_condition_image(io.BytesIO(exif_rotated(upright)), "images[0]", glm.limits)
    assert opened.size == (64, 96) and np.array_equal(np.asarray(opened), np.asarray(upright))
    again = open_condition_image(opened, "images[0]", glm.limits)  # the server checks images twice
    assert np.array_equal(np.asarray(again), np.asarray(upright))


def test_condition_image_size_is_checked_before_any_pixel_is_decoded(glm):
    from glm_image.validation import open_condition_image

    with pytest.raises(GlmImageError, match="images\\[0\\] width = 2048 is not allowed"):
        open_condition_image(io.BytesIO(png_header_only(2048, 2048)), "images[0]", glm.limits)
    with pytest.raises(GlmImageError, match="images\\[0\\]: too many pixels to decode safely"):
        open_condition_image(io.BytesIO(png_header_only(40000, 40000)), "images[0]", glm.limits)
    with pytest.raises(GlmImageError, match="images\\[0\\]: not a readable image \\(not a format") as error:
        open_condition_image(io.BytesIO(b"GIF89a but not really"), "images[0]", glm.limits)
    assert " at 0x" not in str(error.value)


# ---------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def configs_only(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint's config files without its weights: loading the model fails."""
    out = tmp_path_factory.mktemp("configs-only") / "tiny"
    shutil.copytree(tiny_checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    return out


def jsonl(path: Path, *items: dict) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "unwritable", "folder", "empty -o", "line 3", "not utf-8", "empty file", "both prompts",
        "bomb", "surrogate", "steps true",
    ],
)  # fmt: skip
def test_cli_checks_every_input_before_the_model_loads(case, configs_only, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    good = {"prompt": "a", "size": "64x64", "steps": 1}
    args, message = {
        "unwritable": (["p", "-o", "/proc/x.png"], "-o /proc/x.png: cannot write there"),
        "folder": (["p", "-o", str(out)], f"-o {out}: is a folder"),
        "empty -o": (["p", "-o", ""], "-o/--output: empty"),
        "line 3": (
            ["--prompts", jsonl(tmp_path / "line3.jsonl", good, good, {**good, "size": "64x70"})],
            "line3.jsonl, line 3: size 64x70: height = 70 is not allowed",
        ),
        "not utf-8": (
            ["--prompts", str(tmp_path / "latin1.jsonl")],
            "latin1.jsonl, line 2: not UTF-8 text (byte 0xe9)",
        ),
        "empty file": (["--prompts", str(tmp_path / "empty.jsonl")], "no prompts in it"),
        "both prompts": (
            ["p", "--prompts", jsonl(tmp_path / "one.jsonl", good)],
            "give a prompt or --prompts",
        ),
        "bomb": (["p", "--image", str(tmp_path / "bomb.png")], "bomb.png: too many pixels to decode safely"),
        "surrogate": (["a\udcffb"], "prompt: not valid Unicode text"),
        "steps true": (
            ["--prompts", jsonl(tmp_path / "true.jsonl", good, {**good, "steps": True})],
            "true.jsonl, line 2: steps = True",
        ),
    }[case]
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "bomb.png").write_bytes(png_header_only(40000, 40000))
    if "-o" not in args:
        args += ["-o", str(out / "x.png")]
    run = cli("generate", *args, "--model", str(configs_only), "--size", "64x64", "--steps", "1")
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert list(out.iterdir()) == []


def messages(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not progress bars (nor their cursor moves)."""
    lines = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr).replace("\r", "\n").splitlines()
    lines = [line.strip() for line in lines]
    return [line for line in lines if line and not line.startswith(("AR tokens", "DiT steps"))]


def _command() -> list[str]:
    exe = shutil.which("glm-image")
    return [exe] if exe else [sys.executable, "-m", "glm_image.cli"]


def test_cli_write_failure_keeps_the_old_file(tiny_checkpoint, tmp_path):
    """A write that fails (here: the file size limit) leaves the existing file as it was."""
    out = tmp_path / "out.png"
    out.write_bytes(b"the old image")

    def small_files() -> None:  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    command = [*_command(), "generate", "p", "--model", str(tiny_checkpoint), "--size", "64x64"]
    run = subprocess.run(
        [*command, "--steps", "1", "--seed", "1", "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=small_files,
    )
    assert run.returncode == 2, run.stderr
    assert messages(run.stderr) == [
        f"glm-image: error: -o {out}: cannot write (File too large); the old file is unchanged"
    ]
    assert out.read_bytes() == b"the old image" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_cli_ctrl_c_exits_130_with_one_line_and_no_partial_file(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"the old image")
    command = [*_command(), "generate", "p", "--model", str(tiny_checkpoint), "--size", "64x64"]
    process = subprocess.Popen([*command, "--steps", "2000", "-o", str(out)], stderr=subprocess.PIPE)
    err = bytearray()

    def read() -> None:
        for chunk in iter(lambda: process.stderr.read1(256), b""):
            err.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while b"DiT steps" not in err:  # denoising has started: the model is loaded and running
            assert process.poll() is None and time.monotonic() < deadline, err.decode()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
        reader.join(timeout=10)
    assert messages(err.decode()) == ["glm-image: interrupted"]
    assert out.read_bytes() == b"the old image" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_cli_nan_is_one_line_nonzero_and_writes_nothing(tiny_checkpoint, tmp_path):
    """A DiT that returns NaN (as a broken kernel would): no black PNG, one line, status 1."""
    patch = (
        "import sys, glm_image.engine.dit_engine as d; denoise = d.DitEngine.denoise; "
        "d.DitEngine.denoise = lambda *a, **k: denoise(*a, **k) * float('nan'); "
        "from glm_image.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "out.png"
    args = ["generate", "p", "--model", str(tiny_checkpoint), "--size", "64x64", "--steps", "1"]
    run = subprocess.run(
        [sys.executable, "-c", patch, *args, "--seed", "3", "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert run.returncode == 1, run.stderr
    [message] = messages(run.stderr)
    assert message.startswith("glm-image: error: latents: NaN or Inf in 1 of 1 images (seeds [3])")
    assert not out.exists()


def test_nan_pixels_raise_instead_of_a_black_image(glm, monkeypatch):
    """The VAE (or a kernel on new hardware) turning finite latents into NaN is an error too."""
    from glm_image.errors import NonFiniteError

    def nan_decode(latents, return_dict=False):
        b, _, h, w = latents.shape
        return (torch.full((b, 3, h * 8, w * 8), float("nan")),)

    monkeypatch.setattr(glm.dit.vae, "decode", nan_decode)
    with pytest.raises(NonFiniteError, match=r"pixels: NaN or Inf in 1 of 1 images"):
        glm.generate("a", 64, 64, num_inference_steps=1, seed=3)
