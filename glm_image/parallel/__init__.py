"""Several devices (issue 16): tensor-parallel AR, CFG-parallel and Ulysses sequence-parallel DiT.

- ``comm``: one process group's collectives as the models call them (``SINGLE``: one process,
  every collective the identity, so the single-device maths is untouched);
- ``layout``: which shard of each AR weight a tensor-parallel rank holds, and the sizes allowed;
- ``ulysses``: the all-to-all between sequence and heads around the DiT's attention;
- ``config``: ``ParallelConfig`` (``--ar-tp``, ``--dit-cfg-parallel``, ``--dit-sp``, placement),
  checked before any weights load;
- ``launch``: ``StageGroup``, a stage run by rank processes the engine spawns and owns (a driver
  that holds no weights sends each call to every rank and gets rank 0's answer);
- ``worker``: what a rank process runs.

Names load lazily: the models import ``comm`` and ``layout`` without the launcher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .comm import SINGLE, Comm, CommStats
    from .config import ParallelConfig
    from .launch import RankDied, StageGroup

__all__ = ["SINGLE", "Comm", "CommStats", "ParallelConfig", "RankDied", "StageGroup"]

__getattr__ = lazy_attributes(
    __name__,
    {
        "SINGLE": ".comm",
        "Comm": ".comm",
        "CommStats": ".comm",
        "ParallelConfig": ".config",
        "RankDied": ".launch",
        "StageGroup": ".launch",
    },
)
