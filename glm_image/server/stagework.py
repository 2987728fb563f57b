"""What one stage does for the server, wherever it runs: a thread here, a worker process, a Ray
replica. Only the values of ``glm_image.stages`` cross between the server and a stage: an
``ArCall`` (prompts, size, seeds, condition images) in, ``PriorTokens`` (token ids, condition
codes) to the DiT stage in a ``DitCall``, ``Images`` out. The server plans the calls with
``stages.plan_call`` (the seeds drawn before the AR runs, so a call retried elsewhere makes the
same images) and splits the images back per request with ``stages.outputs_of``, as
``GlmImage.run_batch`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Abandoned",
    "StageSpec",
    "load_stage",
]

STAGES = ("ar", "dit")


class Abandoned(Exception):
    """Raised inside a running stage call whose every request was abandoned, to stop it early."""


@dataclass(frozen=True)
class StageSpec:
    """What a stage worker loads: one engine of ``model`` on ``device`` (the options of
    ``GlmImage.from_pretrained``, for that stage alone)."""

    stage: str  # "ar" or "dit"
    model: str
    device: str | None = None  # None: the detected platform
    dtype: str | None = None  # a torch dtype name; None: the device's default
    attention_backend: str | None = None
    quantize: str | None = None  # the stage's weight format (a scheme naming stages works too)


def load_stage(spec: StageSpec, device: str | None = None, **engine_options):
    """The engine of ``spec`` (``ArEngine`` or ``DitEngine``), chosen as ``GlmImage.from_pretrained``
    chooses for both stages; ``device`` overrides ``spec.device`` (a rank's own device);
    ``engine_options`` go to the engine's ``from_pretrained`` (a rank's process groups)."""
    from ..device import default_dtype, resolve_device
    from ..engine import ArEngine, DitEngine
    from ..hub import resolve_checkpoint
    from ..ops import select_ops
    from ..options import torch_dtype

    where = resolve_device(device or spec.device)
    dtype = torch_dtype(spec.dtype) or default_dtype(where)
    ops = select_ops(spec.attention_backend, where)
    engine = ArEngine if spec.stage == "ar" else DitEngine
    return engine.from_pretrained(
        resolve_checkpoint(spec.model),
        device=where,
        dtype=dtype,
        attention_backend=ops,
        quantize=spec.quantize,
        **engine_options,
    )
