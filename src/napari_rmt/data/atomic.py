"""Atomic file writes: a crash or a full disk never leaves half an export behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .errors import NapariRmtError

#: A temporary file older than this is an orphan of a crashed write, not a write in progress.
ORPHAN_AGE_S = 3600.0


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_orphans(path: Path, max_age: float = ORPHAN_AGE_S) -> None:
    """Remove temporary files of ``path`` left by a write that crashed ``max_age`` seconds
    or more ago (an hour by default: another process may be writing it now; 0 from the
    one writer a file has, at its start: a run's own checkpoints)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.lstat().st_mtime >= max_age:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file lives in the same folder so that the final ``os.replace`` is a
    rename on one file system, which POSIX and Windows both make atomic; the folder is
    synced after it, so the rename survives a power cut. A file replaced keeps its
    permissions (``mkstemp`` makes 0600); a new one gets the usual ones (umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise NapariRmtError(f"{path}: is a folder; give a file name to write")
    remove_orphans(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        # Leave the previous file (if any) untouched and remove our partial one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def replace_folder(path: str | os.PathLike, build: Callable[[Path], None], is_ours: Callable[[Path], bool]) -> Path:
    """Build a folder (a zarr store) beside ``path``, then swap it in.

    An existing ``path`` is replaced only when ``is_ours`` says it is an earlier output of
    the same kind: anything else (an input image store, a user's folder) is refused, never
    opened for writing. Until the swap the old folder is whole; a crash between the two
    renames leaves it under ``.NAME.*.old.tmp`` beside the new one (removed an hour later).
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and is_ours(path)):
        raise NapariRmtError(
            f"{path}: exists and is not an earlier napari-rmt output of this kind; "
            "refusing to write over it (choose another path)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old.tmp", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def check_output(
    path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] = (),
    what: str = "output",
    folder: bool = False,
    overwrite: bool = True,
) -> Path:
    """Refuse an output path before any work: (inside) one of the inputs, a folder where a
    file is wanted (``folder``: the output is itself a folder, a zarr store), under a
    file, in a folder that is not writable, or, without ``overwrite``, one that exists
    already (a command writes over nothing it did not make in this call). Returns the path."""
    path = Path(path)
    target = path.resolve()
    for inp in inputs:
        if target.is_relative_to(Path(inp).resolve()):
            raise NapariRmtError(f"{what} {path}: is (or lies inside) the input {inp}; refusing to write there")
    if not overwrite and path.exists():
        raise NapariRmtError(f"{what} {path}: exists already; give --overwrite to replace it, or another name")
    if path.is_dir() and not folder:
        raise NapariRmtError(f"{what} {path}: is a folder; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NapariRmtError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise NapariRmtError(f"{what} {path}: folder {parent} is not writable")
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Serialise first, then write: a value json cannot encode never touches the disk."""
    payload = json.dumps(obj, indent=indent, allow_nan=False).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(payload))
