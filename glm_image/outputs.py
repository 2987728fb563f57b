"""Where the command line writes its images: each output path checked before the model loads
(a name or path too long, a folder, a place that cannot be written: one line naming ``-o``), and
every PNG written atomically (a temporary file beside it, then a rename), so a file is the whole
new image or exactly what it was before."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import GlmImageError

__all__ = ["display", "output_paths", "write_png"]


def output_paths(output: str, count: int) -> list[Path]:
    """The file of each image (numbered when several), each checked to be writable now."""
    if not output.strip():
        raise GlmImageError("-o/--output: empty; allowed: a file path such as out.png")
    out = Path(output)
    _check_length(out)
    try:
        folder = out.name in ("", "..") or out.is_dir()
    except OSError as e:  # ELOOP, EACCES, ...: what stat says is what the write would meet
        raise GlmImageError(f"-o {display(out)}: cannot write there ({e.strerror})") from None
    if folder:
        raise GlmImageError(f"-o {display(out)}: is a folder; allowed: a file path such as {out / 'out.png'}")
    if count == 1:
        paths = [out]
    else:
        paths = [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(1, count + 1)]
    for path in paths:
        _check_writable(path)
    return paths


NAME_MAX = 255  # bytes in one file name, on every file system the engine writes to
_TEMP_NAME_BYTES = 40  # the longest name written beside an output: ".<16 hex>.glm-image.tmp", the probe


def _check_length(path: Path) -> None:
    """A name or path the system cannot take is an error naming the limit, before any stat()
    (which would fail with ENAMETOOLONG: a traceback, not an answer)."""
    where = f"-o {display(path)}"
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise GlmImageError(
                f"{where}: a name of {len(os.fsencode(part))} bytes; allowed: at most {NAME_MAX} bytes a name"
            )
    try:
        limit = os.pathconf(".", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: Linux's
        limit = 4096
    # the path as the system calls get it; the temporary file beside it may have a longer name
    size, name = len(os.fsencode(path)), len(os.fsencode(path.name))
    allowed = limit - 1 - max(0, _TEMP_NAME_BYTES - name)  # PATH_MAX counts the final NUL
    if size > allowed:
        raise GlmImageError(f"{where}: a path of {size} bytes; allowed: at most {allowed} bytes here")


def _check_writable(path: Path) -> None:
    import tempfile

    where = f"-o {display(path)}"
    _check_length(path)  # a numbered name is a few bytes longer than -o
    try:
        if path.is_dir():
            raise GlmImageError(f"{where}: is a folder; allowed: a file path")
        if path.exists() and not path.is_file():
            raise GlmImageError(f"{where}: exists and is not a regular file")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # created when the image is written
        if not folder.is_dir():
            raise GlmImageError(f"{where}: {display(folder)} is not a folder")
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".glm-image-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GlmImageError(f"{where}: cannot write there ({e.strerror})") from None


def display(path: os.PathLike | str) -> str:
    """A path as text that can always be printed (undecodable bytes as backslash escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def write_png(image, path: Path, text: dict[str, str]) -> None:
    """Write atomically: a temporary file beside ``path``, then a rename. ``path`` is either the
    whole new PNG or, after any failure or Ctrl-C, exactly what it was before."""
    import secrets
    import shutil

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    temp = path.with_name(f".{secrets.token_hex(8)}.glm-image.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never write through someone else's file; mode 0o666 less the umask, as open() does
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if path.is_file():
            shutil.copymode(path, temp)  # an overwritten file keeps its permissions
        os.replace(temp, path)
    except BaseException as e:
        temp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            kept = "; the old file is unchanged" if path.exists() else ""
            raise GlmImageError(f"-o {display(path)}: cannot write ({e.strerror or e}){kept}") from None
        raise
