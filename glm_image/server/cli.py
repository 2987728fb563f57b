"""`glm-image serve`: arguments here; the app itself imports FastAPI only when it runs."""

from __future__ import annotations

import argparse

from ..errors import GlmImageError

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="HTTP server: bigmodel and OpenAI image APIs")
    serve.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    raise GlmImageError("serve: not built yet")
