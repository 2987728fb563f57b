"""One seed per image, resolved the same way by the API, the AR engine and the DiT engine.

``seed`` (an int) numbers the images ``seed, seed + 1, ...``; a sequence gives each image its
own; None draws a random first seed. Every seed must fit the generators (a signed 64-bit seed).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from ..errors import GlmImageError

__all__ = ["MAX_SEED", "image_seeds"]

MAX_SEED = 2**63 - 1


def image_seeds(seeds: int | Sequence[int] | None, count: int, field: str = "seeds") -> tuple[int, ...]:
    """``count`` seeds from ``seeds``; errors name ``field`` and the allowed values."""
    if seeds is None:
        first = secrets.randbits(62)  # leaves room for first + count below MAX_SEED
        return tuple(first + i for i in range(count))
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        resolved = tuple(seeds + i for i in range(count))
    else:
        resolved = tuple(int(s) for s in seeds)
        if len(resolved) != count:
            raise GlmImageError(f"{field}: got {len(resolved)}, need one per image ({count}) or a single int")
    if not all(0 <= s <= MAX_SEED for s in resolved):
        raise GlmImageError(
            f"{field} = {seeds!r}; allowed: 0..{MAX_SEED} for every image (image i uses seed + i)"
        )
    return resolved
