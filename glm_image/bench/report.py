"""The one JSON layout every benchmark writes, and its Markdown tables (documented in benchmarks/README.md).

A report is ``{"schema", "benchmark", "created", "machine", "config", "results", "notes"}``:
``results`` is a list with one object per measured case, whose fields depend on ``benchmark``
(``speed``, ``quality``, ``ar_decode``, ``dit_step``, ``kernels``, ...); ``config`` is what the run
was asked to do; ``notes`` are sentences a reader needs to interpret the numbers. Keeping every
benchmark on one layout lets one script compare or plot any of them. These helpers import only
torch and the standard library, so a script can use them without loading a model.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import GlmImageError
from ..request import parse_size as _parse_size

__all__ = [
    "SCHEMA",
    "build_report",
    "check_output_path",
    "device_name",
    "machine",
    "markdown_table",
    "median",
    "parse_size",
    "parse_sizes",
    "save_report",
    "synchronize",
    "timed",
    "write_report",
]

SCHEMA = "glm-image-bench/1"  # bumped when a documented field changes meaning


def device_name(device: str | torch.device | None = None) -> str:
    """What the run used: the accelerator's marketing name, or the CPU's."""
    device = torch.device(device) if device is not None else None
    kind = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.get_device_name(device if device is not None and device.index is not None else 0)
    if kind == "npu" and hasattr(torch, "npu"):  # registered by torch_npu, which glm_image.device imports
        return str(torch.npu.get_device_name())
    return f"cpu ({_cpu_model()})"


def _cpu_model() -> str:
    try:  # Linux names the model here; platform.processor() often says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | torch.device | None = None) -> dict[str, Any]:
    """The machine a report was measured on (the numbers mean nothing without it)."""
    info: dict[str, Any] = {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "glm_image": __version__,
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued device work, so a host clock around it measures the work itself (None:
    the GPU if there is one)."""
    from ..device import synchronize as sync

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sync(torch.device(device))


def timed(fn: Callable[[], object], device: str | torch.device | None = None) -> float:
    """Wall seconds of one call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' -> (width, height)."""
    return _parse_size(text)


def parse_sizes(text: str, field: str = "--sizes") -> list[tuple[int, int]]:
    """'512x512,1024x768' -> [(512, 512), (1024, 768)]."""
    sizes = [_parse_size(part.strip(), field) for part in str(text).split(",") if part.strip()]
    if not sizes:
        raise GlmImageError(f"{field} = {text!r}: expected WIDTHxHEIGHT[,WIDTHxHEIGHT...]")
    return sizes


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(numerator: float, denominator: float | None, digits: int = 3) -> float | None:
    """``numerator / denominator`` to ``digits`` significant digits (None without a denominator).

    Significant digits, not decimals: a ratio far below 1 (an interpreted kernel against a
    library call, on a CPU dry run) stays a positive number instead of rounding to 0.
    """
    if not denominator:
        return None
    return float(f"{numerator / denominator:.{digits}g}")


def build_report(
    benchmark: str,
    results: list[dict[str, Any]],
    *,
    config: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    device: str | torch.device | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A report in the shared layout; ``extra`` adds benchmark-specific top-level keys."""
    return {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(device),
        "config": dict(config or {}),
        "results": results,
        "notes": list(notes),
        **extra,
    }


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, in bytes; other systems' are not smaller in practice


def check_output_path(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, an output path the run could not write at its end: a benchmark
    takes minutes to hours, and an error found only when the report is written loses it all.

    Checks what a write would hit: an empty name, a folder or a device in the way, a name or a path
    over the system's limits, a parent that is a file, a folder that cannot be written in. The
    parent folders are created, as the write would (``save_report`` makes them too).
    """
    text = os.fspath(path)
    if not text.strip():
        raise GlmImageError(f"{flag}: empty; allowed: a file path")
    path = Path(text)
    try:
        raw = os.fsencode(text)
    except UnicodeError:
        raise GlmImageError(f"{flag} {text!r}: not a valid file name on this system") from None
    if len(raw) > PATH_MAX:
        raise GlmImageError(f"{flag}: the path is {len(raw)} bytes; allowed: at most {PATH_MAX}")
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise GlmImageError(f"{flag}: the file name is longer than {NAME_MAX} bytes")
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise GlmImageError(f"{flag} {text}: is a folder; allowed: a file path")
    if path.exists() and not path.is_file():
        raise GlmImageError(f"{flag} {text}: exists and is not a regular file")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GlmImageError(f"{flag} {text}: cannot create its folder {folder} ({e.strerror})") from None
    if not folder.is_dir():  # mkdir(exist_ok) accepts an existing file on some systems
        raise GlmImageError(f"{flag} {text}: {folder} is not a folder")
    try:  # a real write, not os.access: it also catches read-only mounts and full disks
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-", delete=True)  # noqa: SIM115
        probe.close()
    except OSError as e:
        raise GlmImageError(f"{flag} {text}: cannot write in {folder} ({e.strerror})") from None
    return path


def save_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write the JSON report atomically: a temporary file in the same folder, then a rename, so an
    interrupted write never leaves half a report under the name."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    fd, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name[:200]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return out


def write_report(
    benchmark: str,
    results: list[dict[str, Any]],
    out: str | Path | None,
    *,
    config: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    table: str | None = None,
) -> dict[str, Any]:
    """Build a report, save it to ``out`` (if given) and print ``table`` (else the JSON)."""
    report = build_report(benchmark, results, config=config, notes=notes)
    if out:
        save_report(report, out)
    print(table if table is not None else json.dumps(report, indent=2, ensure_ascii=False))
    return report


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; None prints as an em dash."""

    def cell(value: object) -> str:
        return "—" if value is None else str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
