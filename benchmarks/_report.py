"""The JSON layout every benchmark writes (documented in benchmarks/README.md)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def timed(fn) -> float:
    """Wall seconds of one call (synchronising a GPU before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' -> (width, height)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_report(benchmark: str, results: list[dict[str, Any]], out: str | Path | None) -> dict[str, Any]:
    report = {
        "benchmark": benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
    return report
