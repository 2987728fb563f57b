"""Construction, type checks and validation helpers shared by every config dataclass."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..errors import CheckpointError, ConfigError

_C = TypeVar("_C", bound="_Config")

# Keys every config file may carry that say where it came from, not what it computes.
_PROVENANCE = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_name_or_path",
        "_from_model_config",
        "architectures",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "initializer_range",
        "attention_dropout",
        "use_cache",
    }
)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read one JSON object from ``path``; errors name the file (and the line for bad JSON)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing config file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; JSON lists become tuples. Returns the value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r}")  # a bug in this file, not user input


@dataclass(frozen=True)
class _Config:
    """Shared construction and validation; subclasses declare fields and ``_validate``."""

    source: str = field(default="<dict>", compare=False, repr=False, kw_only=True)
    unknown: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}), compare=False, repr=False, kw_only=True
    )

    _IGNORED: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any], source: str = "<dict>") -> _C:
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("source", "unknown"):
                continue
            where = f"{source}: '{f.name}'"
            if f.name in data:
                kwargs[f.name] = _check_type(data[f.name], hints[f.name], where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{f.name}'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = {k: v for k, v in data.items() if k not in names and k not in cls._IGNORED | _PROVENANCE}
        return cls(**kwargs, source=source, unknown=types.MappingProxyType(unknown))

    @classmethod
    def from_json(cls: type[_C], path: str | Path) -> _C:
        return cls.from_dict(read_json(path), source=str(path))

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        pass

    def _fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.source}: '{key}' = {getattr(self, key)!r} {message}")

    def _require_positive(self, *keys: str) -> None:
        for key in keys:
            if getattr(self, key) <= 0:
                self._fail(key, "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """The typed fields as JSON-ready values (tuples as lists), without provenance."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("source", "unknown"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
