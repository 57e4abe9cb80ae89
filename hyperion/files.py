"""Files Hyperion writes: atomically, and never over one of the user's inputs.

Every write goes to a temporary file in the target's folder, which is renamed over
the target once complete (and removed on any error), so a crash or a full disk never
leaves a half-written file, and never a damaged one where a good one was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from hyperion.errors import OutputError

Content = str | bytes | Callable[[BinaryIO], object]


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


_CREATE_MODE = 0o666 & ~_umask()


def write_atomic(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function writing to a binary file)
    to ``path`` through a temporary file in the same folder and a rename.

    Raises :class:`OutputError` naming the file when it cannot be written; the
    temporary file is removed on every error path, and ``path`` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name to write to")
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp makes the file private (0600); the result gets what open() would give it.
        os.fchmod(fd, _CREATE_MODE)
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, str):
                handle.write(content.encode("utf-8"))
            elif isinstance(content, bytes | bytearray | memoryview):
                handle.write(content)
            else:
                content(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); check the folder exists and is "
                          "writable, and that the disk has room") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Are ``a`` and ``b`` the same file (hard and symbolic links included)?"""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        try:
            return Path(a).resolve() == Path(b).resolve()
        except (OSError, RuntimeError):
            return False


def refuse_overwrite(target: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]],
                     option: str = "output") -> None:
    """Raise :class:`OutputError` if ``target`` is one of ``inputs`` ((what, path) pairs:
    the model, its data files, a schedule being read, an input array)."""
    for what, path in inputs:
        if path is not None and same_file(target, path):
            raise OutputError(f"{option}: {target} is {what}; refusing to overwrite it; write to another file")


__all__ = ["refuse_overwrite", "same_file", "write_atomic"]
