"""The two stages of a generation, and a stage you can call wherever it runs.

- ``calls``: what a stage is asked and answers (``ArCall`` -> ``PriorTokens``, ``DitCall`` ->
  ``Images``), ``plan_call`` and ``outputs_of`` (one request's images, wherever it ran);
- ``run``: how a stage runs on one loaded engine (``ar_stage``, ``dit_stage``, ``run_on``);
- ``handle``: ``StageSpec``, ``load_stage``, the ``StageHandle`` protocol, ``LocalStage`` and
  ``open_stage`` (the one place that picks local or process);
- ``process``: ``ProcessStage``, a stage on rank processes this process owns (``worker``: what a
  rank runs); ``spmd``: a rank's part under torchrun.

The died and cancelled errors are ``errors.StageDied`` and ``errors.Cancelled``. ``parallel``
keeps the collectives, the layouts and Ulysses; Ray's handle is ``server.ray_app.RayStage``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .calls import ArCall, DitCall, GenerationOutput, Images, PriorTokens, output_of, outputs_of, plan_call
from .handle import LocalStage, StageHandle, StageSpec, as_handle, load_stage
from .opening import open_stage
from .run import ar_stage, dit_stage, run_on

if TYPE_CHECKING:
    from .process import ProcessStage

__all__ = [
    "ArCall",
    "DitCall",
    "GenerationOutput",
    "Images",
    "LocalStage",
    "PriorTokens",
    "ProcessStage",
    "StageHandle",
    "StageSpec",
    "ar_stage",
    "as_handle",
    "dit_stage",
    "load_stage",
    "open_stage",
    "output_of",
    "outputs_of",
    "plan_call",
    "run_on",
]

__getattr__ = lazy_attributes(__name__, {"ProcessStage": ".process"})
