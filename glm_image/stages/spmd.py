"""Ranks launched by ``torchrun`` instead of by the engine.

``torchrun --nproc-per-node N -m glm_image.cli generate ... --ar-tp 2 --dit-sp 2`` starts N copies
of the command; each is one rank (its device: ``LOCAL_RANK``). ``GlmImage.from_pretrained`` sees
the launch (``launched``) and, instead of spawning ranks, joins the process group torchrun set up
and loads this rank's shard of each stage it takes part in (``load``): with placement ``same``
the AR's ranks are 0..ar_tp-1 and the DiT's 0..dit_ranks-1 (N = the larger), with ``separate``
the DiT's follow the AR's (N = the sum). Every rank then runs the same calls (``SpmdStage``):
the first rank's call (its seeds) is sent to all, the stage's ranks run it, and its first rank's
answer is sent to all, so the next stage and every entry point see one answer. Only rank 0
writes files (``GlmImage.answers``). torchrun owns the processes: it stops them all when one
fails or on Ctrl-C.
"""

from __future__ import annotations

import os

from .handle import StageSpec, load_stage
from .run import run_on

__all__ = ["SpmdStage", "launched", "load"]


def launched() -> bool:
    """True in a process torchrun started as one of several ranks."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


class SpmdStage:
    """This rank's part of one stage in an SPMD launch: its engine (None when the stage has no
    rank here), answering calls together with every other rank of the world. A stage handle
    (``handle.StageHandle``): torchrun stops every rank when one dies, so it is never broken."""

    broken = None

    def __init__(self, stage: str, engine, config, first: int, control, device) -> None:
        self.stage, self.engine, self.config = stage, engine, config
        self.first, self.control, self.device = first, control, device

    def to(self, device) -> None:
        """The ranks stay on their devices."""

    def describe(self) -> dict:
        return {"handle": "torchrun", "stage": self.stage, "rank": self.control.rank, "first": self.first}

    @property
    def attention_backend(self) -> str | None:
        return self.engine.model.ops.name if self.engine is not None else None

    def run(self, call, progress=None):
        """The stage's answer to the world's first rank's ``call``, on every rank."""
        import torch.distributed as dist

        sent = [call]
        dist.broadcast_object_list(sent, src=0, group=self.control.group)
        answer = None
        if self.engine is not None:
            answer = run_on(self.stage, self.engine, sent[0], progress if self.control.rank == 0 else None)
        got = [answer]
        dist.broadcast_object_list(got, src=self.first, group=self.control.group)
        return got[0]

    def close(self) -> None:
        """torchrun owns the processes; the process group ends with them."""


def load(root, parallel, device, dtype, attention_backend: str | None, scheme) -> tuple[SpmdStage, SpmdStage]:
    """Join torchrun's process group and load this rank's part of both stages: ``device`` (its
    type; the index is ``LOCAL_RANK``), ``dtype`` (a torch dtype), ``attention_backend`` (a backend
    name), ``scheme`` (a ``QuantScheme``), as ``GlmImage.from_pretrained`` resolved them."""
    import torch
    import torch.distributed as dist

    from ..config import CheckpointConfig
    from ..errors import GlmImageError
    from ..parallel.comm import CommStats
    from ..parallel.groups import backend, control_group, stage_groups

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    separate = parallel.placement == "separate"
    needed = parallel.ar_tp + parallel.dit_ranks if separate else max(parallel.ar_tp, parallel.dit_ranks)
    if world != needed:
        raise GlmImageError(
            f"torchrun started {world} ranks, but {parallel.describe()} takes {needed}; allowed: "
            f"--nproc-per-node {needed}"
        )
    if device.type != "cpu":
        device = torch.device(device.type, int(os.environ["LOCAL_RANK"]))
        getattr(torch, device.type).set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend(device))
    control = control_group(device, world, rank)
    config = CheckpointConfig.from_dir(root)
    stages = []
    for stage, first in (("ar", 0), ("dit", parallel.ar_tp if separate else 0)):
        spec = StageSpec(
            stage,
            str(root),
            dtype=str(dtype).removeprefix("torch."),
            attention_backend=attention_backend,
            quantize=f"{stage}={scheme.stage(stage)}",  # "int4" alone is refused: it is the AR's only
            tp=parallel.ar_tp,
            cfg=parallel.dit_cfg,
            sp=parallel.dit_sp,
        )
        groups = stage_groups(spec, first, world, rank, device, CommStats())
        engine = load_stage(spec, device, groups) if groups is not None else None
        stages.append(SpmdStage(stage, engine, config, first, control, device))
    return stages[0], stages[1]
