"""Module attributes that import on first use: a package's public names without its import cost."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``name`` comes from the module ``exports[name]``
    (relative to ``package``), imported on first access and then kept in the package."""

    def getattr_(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name], package)
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip this function
        return value

    return getattr_
