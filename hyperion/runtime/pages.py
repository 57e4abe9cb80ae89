"""The pages onnxruntime maps from a file, found and let go.

A relaid segment's session (:mod:`hyperion.runtime.relayout`) loads its weights --
pre-packed, re-laid -- from a data file that onnxruntime maps into the process
itself: the pages count in RSS once a run has read them, and nothing in
onnxruntime's API lets them go while the session lives. Linux lists every mapping
of the process in ``/proc/self/maps``, so the runtime finds the ranges that map the
segment's data file and ``madvise``s them: ``MADV_DONTNEED`` drops the pages from the
process (the page cache keeps them; the next run maps them again without reading
the disk), ``MADV_WILLNEED`` reads them ahead. Python's ``mmap`` module can advise
only mappings it made, so the call goes to libc through ctypes.

Dropping is safe only for pages that still equal the file: onnxruntime maps the
file private and writable, and a page it wrote would be a private copy that
``MADV_DONTNEED`` discards. Its kernels never write a constant; :func:`written_bytes`
checks it (``/proc/self/smaps``), and the runtime refuses to drop a range that has
private copies rather than lose them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MAPS = Path("/proc/self/maps")
SMAPS = Path("/proc/self/smaps")


@dataclass(frozen=True)
class PageRange:
    """One mapping of a file in this process: its address and length in bytes."""

    start: int
    length: int


def supported() -> bool:
    """Whether this system lists its mappings and can advise them (Linux)."""
    return sys.platform.startswith("linux") and MAPS.is_file() and _madvise() is not None


def mapped_ranges(path: Path) -> tuple[PageRange, ...]:
    """Every mapping of ``path`` in this process, in address order (none where the system
    does not list them: there the pages stay mapped)."""
    if not supported():
        return ()
    target = os.fspath(path.resolve())
    ranges = []
    with MAPS.open(encoding="utf-8", errors="surrogateescape") as lines:
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target:
                start, stop = (int(x, 16) for x in fields[0].split("-"))
                ranges.append(PageRange(start, stop - start))
    return tuple(ranges)


def written_bytes(ranges: Iterable[PageRange]) -> int:
    """Bytes of private copies (pages written since mapped) in ``ranges``."""
    starts = {r.start for r in ranges}
    total, inside = 0, False
    with SMAPS.open(encoding="utf-8", errors="surrogateescape") as lines:
        for line in lines:
            head = line.split(maxsplit=1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):     # a mapping's header line
                inside = int(head.split("-")[0], 16) in starts
            elif inside and head == "Anonymous:":
                total += int(line.split()[1]) * 1024
    return total


def advise(ranges: Iterable[PageRange], advice: int) -> None:
    """``madvise`` every range: ``mmap.MADV_DONTNEED`` drops its pages from this process,
    ``mmap.MADV_WILLNEED`` reads them ahead."""
    call = _madvise()
    if call is None:
        return
    for page_range in ranges:
        if call(page_range.start, page_range.length, advice) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"madvise({advice}) of {page_range.length} bytes: {os.strerror(error)}")


def drop(ranges: Iterable[PageRange]) -> None:
    advise(ranges, mmap.MADV_DONTNEED)


@cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function
