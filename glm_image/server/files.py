"""Generated PNGs on disk, named by random ids; no string from a request ever becomes a path.

A file is written to a temporary name in the output directory and moved into place with
``os.replace``, so a reader (``GET /files/...``) sees a whole PNG or nothing. The store keeps an
index id -> path of the files it owns (those it wrote, and those with its name pattern found at
startup); a download looks the id up in that index after checking the name's pattern.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import tempfile
import threading
from pathlib import Path

from ..errors import GlmImageError

__all__ = ["FILE_NAME", "FileStore", "encode_png"]

# fullmatch, not match with "$": "$" also matches before a trailing newline.
FILE_NAME = re.compile(r"([0-9a-f]{32})\.png")


def encode_png(image, text: dict[str, str]) -> bytes:
    """PNG bytes with the generation parameters as iTXt chunks (what ``glm-image generate`` writes)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class FileStore:
    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-", delete=True)  # noqa: SIM115
            probe.close()
        except OSError as e:
            raise GlmImageError(f"--output-dir {root}: not a writable folder ({e.strerror})") from None
        self.root = root.resolve()
        self._lock = threading.Lock()
        self._index: dict[str, Path] = {}
        for entry in os.scandir(self.root):
            match = FILE_NAME.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                self._index[match.group(1)] = Path(entry.path)

    def write(self, data: bytes) -> str:
        """Store ``data`` under a new random id; returns the file name (``<id>.png``)."""
        file_id = secrets.token_hex(16)
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            final = self.root / f"{file_id}.png"
            os.replace(temp, final)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._index[file_id] = final
        return final.name

    def remove(self, names) -> None:
        """Delete files this store wrote (``write``'s names): the images of a request that failed
        part way, so no file stays that no answer refers to."""
        for name in names:
            match = FILE_NAME.fullmatch(name)
            if match is None:
                continue
            with self._lock:
                path = self._index.pop(match.group(1), None)
            if path is not None:
                path.unlink(missing_ok=True)

    def recent(self, limit: int) -> list[tuple[str, float, int]]:
        """Up to ``limit`` stored files, newest first: (file name, modification time, bytes).
        Files removed behind the store's back are skipped."""
        with self._lock:
            paths = list(self._index.values())
        found = []
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((path.name, stat.st_mtime, stat.st_size))
        found.sort(key=lambda item: (item[1], item[0]), reverse=True)
        return found[:limit]

    def lookup(self, name: str) -> Path | None:
        """The path of a stored file, or None: for any name not ``<32 hex>.png`` or not stored here."""
        match = FILE_NAME.fullmatch(name)
        if match is None:
            return None
        with self._lock:
            path = self._index.get(match.group(1))
        return path if path is not None and path.is_file() else None
