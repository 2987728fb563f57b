"""Peak memory of one timed run, measured the way the device allows.

- CUDA (and NPU, whose torch_npu mirrors the API): ``reset_peak_memory_stats`` before,
  ``max_memory_allocated`` after: the tensors the run held at its peak (the caching allocator's
  spare blocks are not counted).
- CPU on Linux: the kernel's peak resident set size (``VmHWM`` in /proc/self/status), reset
  before the run by writing 5 to /proc/self/clear_refs: exact, and nothing runs during the run.
- CPU elsewhere: the resident set size sampled every 5 ms on a thread (psutil); a spike shorter
  than that can be missed.

On a CPU the figure is the whole process: every model loaded in it counts, not only the one that
runs. ``increase`` (peak minus the value at the start) is what the run itself added.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import torch

__all__ = ["PeakMemory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> bool:
    """Ask Linux to restart VmHWM from the current RSS; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """``with PeakMemory(device) as mem: run()`` -> ``mem.peak``, ``mem.start`` (bytes), ``mem.method``."""

    def __init__(self, device: str | torch.device, *, sample_seconds: float = 0.005, use_proc: bool = True):
        self.device = torch.device(device)
        self.sample_seconds = sample_seconds
        self.use_proc = use_proc
        self.start = self.peak = 0
        self.method = ""
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.start)

    def _accelerator(self):
        if self.device.type == "cuda":
            return torch.cuda
        if self.device.type == "npu" and hasattr(torch, "npu"):
            return torch.npu
        return None

    def __enter__(self) -> PeakMemory:
        accelerator = self._accelerator()
        if accelerator is not None:
            accelerator.synchronize(self.device)
            accelerator.reset_peak_memory_stats(self.device)
            self.start = accelerator.memory_allocated(self.device)
            self.method = (
                f"torch.{self.device.type}.max_memory_allocated (tensors the process held on the device)"
            )
        elif self.use_proc and _reset_peak_rss():
            self.start = (_status_kib("VmRSS") or 0) * 1024
            self.method = "peak RSS of the process (Linux VmHWM, reset before each run)"
        else:
            import psutil

            process = psutil.Process()
            self.start = self.peak = process.memory_info().rss
            self.method = f"peak RSS of the process (psutil, sampled every {self.sample_seconds * 1000:g} ms)"
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(self.sample_seconds):
                    self.peak = max(self.peak, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, name="glm-image-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        accelerator = self._accelerator()
        if accelerator is not None:
            accelerator.synchronize(self.device)
            self.peak = accelerator.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            import psutil

            self.peak = max(self.peak, psutil.Process().memory_info().rss)
        else:
            self.peak = (_status_kib("VmHWM") or 0) * 1024
