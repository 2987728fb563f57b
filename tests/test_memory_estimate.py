"""The planner's estimate against the measured peak over a matrix of size, batch, image-to-image,
step cache, quantization and residency, on the tiny model on a CPU.

Measured: the peak resident set of a fresh process (Linux ``VmHWM``, reset before each run by
``bench.memory.PeakMemory``), one run per row, in one child process (each row's pipeline is
dropped and the heap trimmed before the next). What this can and cannot show: on tiny the
weights (0.1 GB) and activations are small, and the process's libraries (~0.45 GB of torch,
transformers, diffusers) stand where the estimate's 0.5 GB ``RESERVE`` stands; so the bound
checks that every term the estimate adds for a row (the condition K/V, the step cache, a batch,
a larger size) keeps it above what the process really reaches, and not far above. The terms that
dominate at the released widths are measured on a GPU (``gpu_run.sh`` stage ``offload``:
``torch.cuda.max_memory_allocated`` against the estimate per residency).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

ROWS = [  # size, images, image-to-image, step cache, quantize, residency
    (64, 1, False, False, "none", "resident"),
    (256, 1, False, False, "none", "resident"),
    (64, 2, False, False, "none", "resident"),
    (64, 1, True, False, "none", "resident"),
    (64, 1, False, True, "none", "resident"),
    (64, 1, False, False, "int8", "resident"),
    (64, 1, False, False, "none", "dit_offload"),
    (128, 2, True, True, "int8", "dit_offload"),
]

_CHILD = """
import ctypes, gc, json, sys, torch
from PIL import Image
from glm_image import GlmImage
from glm_image.bench.memory import PeakMemory
from glm_image.engine.choices import StepCacheOptions
from glm_image.residency import estimate_memory
root, rows = sys.argv[1], json.loads(sys.argv[2])
libc = ctypes.CDLL("libc.so.6")
GlmImage.from_pretrained(root).generate("warm", 64, 64, num_inference_steps=1, seed=0)  # libraries in
for size, images, i2i, cache, quantize, residency in rows:
    gc.collect(); libc.malloc_trim(0)
    with PeakMemory("cpu") as mem, torch.inference_mode():
        pipe = GlmImage.from_pretrained(root, residency=residency, quantize=quantize)
        pipe.generate(
            "a red car", size, size, num_inference_steps=3, seed=0, num_images_per_prompt=images,
            images=[Image.new("RGB", (size, size), (200, 30, 30))] if i2i else None,
            dit_cache=StepCacheOptions(threshold=0.5, warmup=1) if cache else None,
        )
    plan, _, dtype = pipe.memory
    estimate = estimate_memory(
        root, quantize, dtype, height=size, width=size, batch=images, conditions=int(i2i), step_cache=cache
    ).peak(residency)
    del pipe
    print(json.dumps({"row": [size, images, i2i, cache, quantize, residency], "measured": mem.peak,
                      "estimate": estimate, "method": mem.method}), flush=True)
"""


def test_the_estimate_covers_the_measured_peak(tiny_checkpoint):
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(tiny_checkpoint), json.dumps(ROWS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    )
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(ROWS)
    if "VmHWM" not in results[0]["method"]:
        pytest.skip("needs Linux's peak RSS")
    ratios = {tuple(r["row"]): r["estimate"] / r["measured"] for r in results}
    # a batch: on a CPU the engine runs a call's images apart (batch-invariant), so the process
    # grows less than the estimate, which counts them together as a GPU runs them (measured 1.30)
    bound = {row: 1.35 if row[1] > 1 else 1.3 for row in ratios}
    assert all(1.0 <= ratio <= bound[row] for row, ratio in ratios.items()), ratios
