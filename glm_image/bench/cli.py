"""`glm-image bench`: arguments here; the harness imports the reference libraries only when it runs."""

from __future__ import annotations

import argparse

from ..errors import GlmImageError

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="speed against the reference; text-rendering quality")
    bench.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    raise GlmImageError("bench: not built yet")
