"""Several devices (issue 16): tensor-parallel AR, CFG-parallel and Ulysses sequence-parallel DiT.

- ``comm``: one process group's collectives as the models call them (``SINGLE``: one process,
  every collective the identity, so the single-device maths is untouched);
- ``layout``: which shard of each AR weight a tensor-parallel rank holds, and the sizes allowed;
- ``ulysses``: the all-to-all between sequence and heads around the DiT's attention;
- ``config``: ``ParallelConfig`` (``--ar-tp``, ``--dit-cfg-parallel``, ``--dit-sp``, placement),
  checked before any weights load;
- ``groups``: the process groups of a stage's ranks (backend, control group, TP / CFG / SP).

Who starts the ranks and sends them calls is ``glm_image.stages`` (``ProcessStage``, torchrun's
``SpmdStage``): nothing here imports upward. Names load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .comm import SINGLE, Comm, CommStats
    from .config import ParallelConfig

__all__ = ["SINGLE", "Comm", "CommStats", "ParallelConfig"]

__getattr__ = lazy_attributes(
    __name__,
    {
        "SINGLE": ".comm",
        "Comm": ".comm",
        "CommStats": ".comm",
        "ParallelConfig": ".config",
    },
)
