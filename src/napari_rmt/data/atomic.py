"""Atomic file writes: a crash or a full disk never leaves half an export behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file lives in the same folder so that the final ``os.replace`` is a
    rename on one file system, which POSIX and Windows both make atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave the previous file (if any) untouched and remove our partial one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Serialise first, then write: a value json cannot encode never touches the disk."""
    payload = json.dumps(obj, indent=indent, allow_nan=False).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(payload))
