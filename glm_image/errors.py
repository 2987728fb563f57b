"""Errors a user can cause. Each message names the file or field and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence


class GlmImageError(Exception):
    """Base class of every error this engine raises on purpose."""


class ConfigError(GlmImageError, ValueError):
    """A config file is missing, unreadable, or holds a value the engine cannot run."""


class CheckpointError(GlmImageError, FileNotFoundError):
    """A checkpoint folder or one of its files is missing."""


class CorruptCheckpointError(GlmImageError, ValueError):
    """A weights file exists but cannot be read: truncated, malformed header, bad index."""


class WeightsMismatchError(GlmImageError, ValueError):
    """The tensors in a checkpoint do not match the module they are loaded into."""


class NonFiniteError(GlmImageError):
    """The engine produced NaN or Inf: an engine or kernel fault, not the request's values (those
    are validated). Nothing is written; the server answers 500 with an error id."""


def check_finite(values, stage: str, seeds: Sequence[int] | None = None) -> None:
    """Raise ``NonFiniteError`` when a row of ``values`` (B, ...) holds NaN or Inf: never let a
    black or garbage image out. ``stage`` names what was checked ("latents", "pixels")."""
    import torch  # this module stays importable without torch

    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)  # (B,)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten().tolist()
    which = f"seeds {[seeds[i] for i in rows]}" if seeds is not None else f"rows {rows}"
    raise NonFiniteError(
        f"{stage}: NaN or Inf in {len(rows)} of {values.shape[0]} images ({which}); nothing was "
        "written. The request's values were valid: this is an engine or kernel fault"
    )


class StageDied(RuntimeError):
    """A stage's process (a rank, a worker, a replica) stopped, or stopped answering, while the
    stage was needed; the message says which and how. Not the user's input: the CLI exits 1, the
    server answers 500 naming it. Shown to clients: it holds nothing but our own words."""


class Cancelled(Exception):
    """Raised inside a running stage call (from its progress callback) to stop it early: every
    request of a server's call was abandoned, or the ranks agreed to stop."""


class StageError(RuntimeError):
    """An unexpected error inside a stage's process (a rank, a worker): its type and traceback."""


def reply_of(error: BaseException) -> tuple[str, str]:
    """(kind, text) of an error on a stage's side, as its process reports it to the handle:
    "cancelled", "nonfinite", "invalid" (a ``GlmImageError``) or "error" (anything else, with
    its traceback); ``error_of`` turns it back into the error the handle raises."""
    import traceback

    if isinstance(error, Cancelled):
        return "cancelled", ""
    if isinstance(error, NonFiniteError):
        return "nonfinite", str(error)
    if isinstance(error, GlmImageError):
        return "invalid", str(error)
    text = "".join(traceback.format_exception(error))
    return "error", f"{type(error).__name__}: {error}\n{text}"


def error_of(kind: str, text: str, where: str) -> BaseException:
    """The error a handle raises for a stage's (kind, text) (``reply_of``); ``where`` names the
    stage (and rank) for an unexpected error."""
    if kind == "cancelled":
        return Cancelled(text or f"{where}: the call was stopped")
    if kind == "nonfinite":
        return NonFiniteError(text)
    if kind == "invalid":
        return GlmImageError(text)
    return StageError(f"{where}: {text}")
