"""A newcomer's `glm-image info` and first errors (issue 30): one memory plan, shown alike as text
and JSON, for the device and dtype `generate` would use; a scheme the device cannot run said in
the plan; a bad --max-memory, --device or GLM_IMAGE_CACHE one line and exit 2 on info, generate
and serve, before any model loads."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch

from glm_image.cli import main
from glm_image.device import detect_platform, npu_module
from glm_image.errors import GlmImageError
from glm_image.info import format_memory_report, memory_report
from glm_image.quant import check_device, parse_quantize
from glm_image.residency import MAX_MEMORY, parse_memory
from glm_image.synthetic import preset_dir

HERE = detect_platform().value  # where `generate` runs with no --device
HERE_DTYPE = "float32" if HERE == "cpu" else "bfloat16"


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def memory_block(out: str) -> str:
    """The text output's memory plan: from its "Memory plan" line to the end of its indented lines."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Memory plan"))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * 17):
        end += 1
    return "\n".join(lines[start:end])


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any engine starts loading weights."""
    from glm_image.engine import ArEngine, DitEngine

    def never(*args, **kwargs):
        raise AssertionError("a model loaded before the bad input was refused")

    monkeypatch.setattr(ArEngine, "from_pretrained", never)
    monkeypatch.setattr(DitEngine, "from_pretrained", never)
    # nor a server start (its stage workers load in processes of their own): a regression must
    # fail here, not serve until killed
    monkeypatch.setattr("glm_image.server.cli.uvicorn_server", never)
    monkeypatch.setattr("glm_image.server.workers.staged_processes", never)


# ------------------------------------------------------------------ 1: one plan, text and JSON


def test_info_text_and_json_show_one_plan_for_the_device_generate_would_use(cli):
    """The reported case: text planned cpu/float32 ("does NOT fit ... 34.6 GB"), JSON meta/bfloat16
    ("fits with swapping, 14.97 GB"). Both are now the plan for this machine's device."""
    flags = ("info", "--preset", "glm-image", "--quantize", "int8", "--max-memory", "16GB")
    text, as_json = cli(*flags), cli(*flags, "--json")
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    report = json.loads(as_json.stdout)
    plan = report["plan"]
    assert (report["device"], plan["device"], report["dtype"]) == (HERE, HERE, HERE_DTYPE)
    expected_for = f"{HERE} (detected: no --device given), {HERE_DTYPE} (the default on {HERE})"
    assert report["plan_for"] == expected_for
    block = memory_block(text.stdout)
    assert f"for {expected_for}; 1024x1024, batch 1" in block  # the text says which device and dtype
    # the same numbers: the text's peak, residency and scheme are the JSON's
    assert f"quantize int8, {plan['residency']}: estimated peak {plan['peak_bytes'] / 1e9:.2f} GB" in block
    # the budget is the host's free memory when that is below 16 GB, and may move between the two
    # runs: the word-for-word comparison is the next test's, with a budget no host goes below
    assert ("does NOT fit" in plan["reason"]) == ("does NOT fit" in block)
    if HERE == "cpu":  # a CPU has nothing to swap to: float32, resident, too big for 16 GB
        assert (plan["residency"], plan["fits"]) == ("resident", False)
        assert plan["peak_bytes"] > 30e9 and "does NOT fit" in block


def test_info_text_is_the_rendering_of_the_json(cli):
    """Word for word: the text's memory plan is ``format_memory_report`` of the JSON (a budget
    below any host's free memory, so both runs plan against the same number)."""
    flags = ("info", "--preset", "tiny", "--quantize", "int8", "--max-memory", "300MB", "--device", "cpu")
    text, as_json = cli(*flags), cli(*flags, "--json")
    report = json.loads(as_json.stdout)
    assert report["plan"]["budget_bytes"] == 300 * 10**6
    assert report["plan_for"] == "cpu (as given), float32 (the default on cpu)"
    assert memory_block(text.stdout) == format_memory_report(report)


def test_the_library_without_a_device_plans_for_an_accelerator_and_says_so():
    report = memory_report(preset_dir("glm-image"), "int8", max_memory="16GB")
    assert (report["device"], report["dtype"]) == ("meta", "bfloat16")
    assert report["plan_for"].startswith("no device (meta)")
    assert (report["plan"]["residency"], report["plan"]["fits"]) == ("swap", True)
    assert report["plan"]["runs_on_device"] is None  # meta: not known


# ------------------------------------------------------------------ 2: a scheme the device cannot run


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp8 may run on this machine's GPU")
def test_an_fp8_plan_on_a_cpu_says_the_device_cannot_run_it(cli, tiny_checkpoint, tmp_path):
    flags = ("info", "--preset", "tiny", "--quantize", "fp8", "--device", "cpu")
    report = json.loads(cli(*flags, "--json").stdout)
    plan = report["plan"]
    with pytest.raises(GlmImageError) as refused:  # the check generate makes, word for word
        check_device(parse_quantize("fp8"), torch.device("cpu"))
    assert plan["runs_on_device"] is False and plan["device_error"] == str(refused.value)
    assert "fp8 needs a CUDA GPU" in plan["device_error"]
    text = cli(*flags).stdout
    assert f"CANNOT RUN on cpu: {refused.value}" in memory_block(text)
    # and generate refuses with the same reason
    run = cli("generate", "x", "--quantize", "fp8", "--device", "cpu", "--model", str(tiny_checkpoint))
    assert run.returncode == 2
    assert str(refused.value).split(": ", 1)[1] in one_line(run.stderr)


def test_a_scheme_the_device_runs_is_said_to_run():
    report = memory_report(preset_dir("tiny"), "int8", device="cpu")
    assert report["plan"]["runs_on_device"] is True and report["plan"]["device_error"] is None


# ------------------------------------------------------------------ 3: --max-memory


BAD_SIZES = ["1e400GB", "inf", "nan", "-5GB", "garbage", "9" * 400 + "GB", "0.1B", "1000001TB", ""]


@pytest.mark.parametrize("size", BAD_SIZES)
def test_a_max_memory_that_is_not_a_size_is_refused(size):
    with pytest.raises(GlmImageError, match=r"^max_memory = .*allowed: a positive size up to 1000000TB"):
        parse_memory(size)


def test_sizes_at_the_edges():
    assert parse_memory("1B") == 1 and parse_memory("1000000TB") == MAX_MEMORY
    assert parse_memory("0.5KB") == 500 and parse_memory(MAX_MEMORY) == MAX_MEMORY
    for bad in (MAX_MEMORY + 1, 10**5000, True):
        with pytest.raises(GlmImageError, match="max_memory = "):
            parse_memory(bad)


@pytest.mark.parametrize("size", ["1e400GB", "inf", "9" * 400 + "GB", "-5GB"])
def test_info_refuses_a_bad_max_memory_in_one_line(cli, size):
    run = cli("info", "--preset", "glm-image", f"--max-memory={size}", "--json")
    assert run.returncode == 2 and run.stdout == ""
    assert one_line(run.stderr).startswith("glm-image: error: --max-memory ")
    assert "allowed: a positive size" in run.stderr


@pytest.mark.parametrize("command", ["generate", "serve", "serve-staged"])
def test_generate_and_serve_refuse_a_bad_max_memory_before_loading(
    command, tiny_checkpoint, tmp_path, no_loading, capsys
):
    argv = _argv(command, tiny_checkpoint, tmp_path)
    assert main([*argv, "--max-memory", "9" * 400 + "GB"]) == 2
    assert one_line(capsys.readouterr().err).startswith("glm-image: error: --max-memory ")


def _argv(command: str, model, tmp_path) -> list[str]:
    if command != "generate":
        pytest.importorskip("uvicorn", reason='serve needs the serve extra: pip install -e ".[serve]"')
    if command == "generate":
        return ["generate", "x", "--size", "64x64", "--model", str(model), "-o", str(tmp_path / "x.png")]
    argv = ["serve", "--model", str(model), "--port", "0", "--output-dir", str(tmp_path / "files")]
    return [*argv, "--stages", "separate"] if command == "serve-staged" else argv


# ------------------------------------------------------------------ 3: --device


def _missing_devices() -> list[tuple[str, str]]:
    cases = [("tpu", "is not supported; allowed: cpu, cuda, npu")]
    if torch.version.cuda is None:
        cases.append(("cuda", "no cuda device is available here (this torch build"))
    if npu_module() is None:
        cases.append(("npu", "no npu device is available here (torch_npu is not installed"))
    return cases


@pytest.mark.parametrize(("device", "message"), _missing_devices())
@pytest.mark.parametrize("extra", [(), ("--json",), ("--quantize", "int8")])
def test_info_refuses_a_device_that_is_not_here(cli, device, message, extra):
    """`info --device cuda` printed the CPU's runtime and ignored the flag; with --json it was a
    traceback (torch asserting, or torch's list of twenty device types)."""
    run = cli("info", "--preset", "tiny", "--device", device, *extra)
    assert run.returncode == 2 and run.stdout == ""
    err = one_line(run.stderr)
    assert err.startswith(f"glm-image: error: --device '{device}'") and message in err
    assert "allowed" in err


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize(("device", "message"), _missing_devices())
def test_generate_and_serve_refuse_a_device_that_is_not_here(
    command, device, message, tiny_checkpoint, tmp_path, no_loading, capsys
):
    assert main([*_argv(command, tiny_checkpoint, tmp_path), "--device", device]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"glm-image: error: --device '{device}'") and message in err


@pytest.mark.parametrize("device", ["cpu:x", "cpu:-1", "cpu:0:1"])
def test_a_malformed_device_index_is_one_line(device, capsys):
    assert main(["info", "--preset", "tiny", "--device", device, "--json"]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--device '{device}' is not a device; allowed: cpu, cuda, npu" in err


# ------------------------------------------------------------------ 3: GLM_IMAGE_CACHE


def _unwritable_caches(tmp_path) -> list[tuple[str, str]]:
    """(GLM_IMAGE_CACHE, the reason the OS gives) for caches no user can write."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [(str(a_file), "Not a directory"), (str(a_file / "cache"), "Not a directory")]
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        cases.append((str(locked / "cache"), "Permission denied"))
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK):
        cases.append(("/sys/glm-image-cache", ""))  # a read-only file system, for root too
    return cases


def test_info_with_an_unwritable_cache_is_one_line_naming_glm_image_cache(cli, tmp_path, monkeypatch):
    """`--model tiny` must build its checkpoint in the cache: a traceback from deep in the writer
    (NotADirectoryError, PermissionError) before."""
    for cache, reason in _unwritable_caches(tmp_path):
        monkeypatch.setenv("GLM_IMAGE_CACHE", cache)
        run = cli("info", "--model", "tiny")
        assert run.returncode == 2 and run.stdout == "", (cache, run.stderr)
        err = one_line(run.stderr)
        assert f"GLM_IMAGE_CACHE = {cache}: cannot write the synthetic checkpoint there ({reason}" in err
        assert "set GLM_IMAGE_CACHE to a writable folder" in err


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_generate_and_serve_with_an_unwritable_cache_are_one_line(
    command, tmp_path, monkeypatch, no_loading, capsys
):
    for cache, reason in _unwritable_caches(tmp_path):
        monkeypatch.setenv("GLM_IMAGE_CACHE", cache)
        assert main(_argv(command, "tiny", tmp_path)) == 2, cache
        err = one_line(capsys.readouterr().err)
        assert f"GLM_IMAGE_CACHE = {cache}: cannot write the synthetic checkpoint there ({reason}" in err


def test_a_read_only_cache_still_serves_a_checkpoint_built_before(tmp_path, monkeypatch):
    """Only building needs to write: a shared cache made read-only after the build still works."""
    from glm_image.hub import resolve_checkpoint

    monkeypatch.setenv("GLM_IMAGE_CACHE", str(tmp_path / "cache"))
    built = resolve_checkpoint("tiny")
    monkeypatch.setattr("glm_image.hub.synthetic_cache", _refuse)
    assert resolve_checkpoint("tiny") == built


def _refuse():
    raise AssertionError("the cache was probed for writing although the checkpoint is there")


def test_the_cache_error_without_the_variable_says_it_is_not_set(tmp_path, monkeypatch):
    from glm_image.hub import resolve_checkpoint

    a_file = tmp_path / "home"
    a_file.write_text("")
    monkeypatch.delenv("GLM_IMAGE_CACHE")
    monkeypatch.setenv("HOME", str(a_file))
    with pytest.raises(GlmImageError, match=re.escape("(GLM_IMAGE_CACHE is not set): cannot write")):
        resolve_checkpoint("tiny")
