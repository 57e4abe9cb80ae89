"""Weight tiles read from files by position, and column tiles' tile-major copies.

A weight tile is read with ``preadv`` straight into the buffer the tiles of a run share:
never mapped (a mapped file's pages count in RSS), never copied in between. A column tile
of a row-major ``[rows, columns]`` weight is strided in its file: one read per row, or
per run of rows with the bytes between read into a buffer of one row and dropped. Tiles
the schedule marks ``tile_major`` are instead read from a copy of the weight laid out
tile after tile -- each tile one contiguous read -- written once per machine into
Hyperion's cache (``<cache>/tiles/``, keyed by the weight's file, place, size and
modification time and by the tile edges) from the strided reads, one tile at a time in
the run's own buffer.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Self

import numpy as np

from hyperion.digest import sha256
from hyperion.errors import ModelLoadError
from hyperion.frontend.embedded import cache_dir
from hyperion.schedule import Tiles

# Rows of a column tile read by one ``preadv``: a buffer for the tile's part of each row and
# one for the rest, within Linux's IOV_MAX of 1024 buffers per call.
COALESCED_ROWS = 512


class _OpenFile:
    """A file opened once for the reads of a run (``with reader: ...``); ``what`` names what is
    read from it, for the error."""

    path: Path
    what: str
    _fd: int | None = None

    def __enter__(self) -> Self:
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot read {self.what}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class WeightTileReader(_OpenFile):
    """Tiles of one weight read from its file by position (``preadv``: into the caller's
    buffer, no copy in between), the file opened once for all the tiles of a run.

    A contiguous tile (``axis`` 0) is one read. A column block of a row-major ``[rows,
    columns]`` weight is one read per row -- or, given ``skip`` (a buffer of one row:
    ``Tiles.skip_bytes``), one read per ``COALESCED_ROWS`` rows, the bytes between the
    tile's columns read into ``skip`` and dropped (onnxruntime and numpy offer no
    strided file read; one system call per row cost external_data's 64-byte rows 1 us each)."""

    def __init__(self, path: Path, offset: int, name: str, shape: tuple[int, ...], axis: int) -> None:
        self.path, self.offset, self.name, self.shape, self.axis = path, offset, name, shape, axis
        self.what = f"weight {name!r}"

    def __call__(self, start: int, stop: int, buffer: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        """``weight[start:stop]`` along ``axis`` (0, or 1 of a 2-D weight) into ``buffer``, as a
        C-contiguous array."""
        assert self._fd is not None, "read within the reader's context"
        width = stop - start
        tile_shape = list(self.shape)
        tile_shape[self.axis] = width
        tile = buffer[:math.prod(tile_shape)].reshape(tile_shape)
        item = tile.itemsize
        if self.axis == 0:
            row_bytes = math.prod(self.shape[1:]) * item
            self._read(self.offset + start * row_bytes, [tile], tile.nbytes)
            return tile
        rows, columns = self.shape
        if columns == width:   # the whole weight: one contiguous read
            self._read(self.offset, [tile], tile.nbytes)
            return tile
        tile_rows = list(tile.view(np.uint8))   # one buffer per weight row: the tile's columns of it
        part, gap = width * item, (columns - width) * item
        if skip is None:
            for row, buffer in enumerate(tile_rows):
                self._read(self.offset + (row * columns + start) * item, [buffer], part)
            return tile
        skipped = memoryview(skip)[:gap]
        for first in range(0, rows, COALESCED_ROWS):
            count = min(COALESCED_ROWS, rows - first)
            buffers: list = [skipped] * (2 * count - 1)
            buffers[::2] = tile_rows[first:first + count]
            self._read(self.offset + (first * columns + start) * item, buffers, count * part + (count - 1) * gap)
        return tile

    def _read(self, file_offset: int, buffers: list, length: int) -> None:
        if os.preadv(self._fd, buffers, file_offset) != length:   # type: ignore[arg-type]
            raise ModelLoadError(f"{self.path}: truncated external data for weight {self.name!r}")


class TileMajorReader(_OpenFile):
    """Column tiles of ``shape`` (``[rows, columns]``) read from their tile-major copy at
    ``path``: tile after tile, each ``[rows, width]`` and C-contiguous, one read each."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...]) -> None:
        self.path, self.name, self.rows = path, name, shape[0]
        self.what = f"the tiles of weight {name!r}"

    def __call__(self, start: int, stop: int, buffer: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        """Columns ``[start, stop)`` (a tile's edges) into ``buffer``."""
        assert self._fd is not None, "read within the reader's context"
        tile = buffer[:self.rows * (stop - start)].reshape(self.rows, stop - start)
        # Tiles before this one hold ``start`` columns of every row: its place in the copy.
        if os.preadv(self._fd, [tile], self.rows * start * tile.itemsize) != tile.nbytes:
            raise ModelLoadError(f"{self.path}: truncated tiles of weight {self.name!r}")
        return tile


def tile_major_copy(weight: Path, offset: int, length: int, tiles: Tiles) -> Path:
    """Where the tile-major copy of the weight at ``weight`` (``offset``, ``length``) cut at
    ``tiles.bounds`` is cached (whether written yet or not)."""
    stat = weight.stat()
    key = f"{weight.resolve()}\0{offset}\0{length}\0{stat.st_size}\0{stat.st_mtime_ns}\0{tiles.bounds}"
    return _root() / f"{sha256(key.encode()).hexdigest()}.tiles"


def write_tile_major(reader: WeightTileReader, tiles: Tiles, buffer: np.ndarray, skip: np.ndarray | None,
                     path: Path) -> None:
    """Write the tile-major copy ``path`` from ``reader``'s strided reads, one tile at a time in
    ``buffer`` (and ``skip``); atomically, so a copy is never seen half-written."""
    handle, building = tempfile.mkstemp(prefix=".building-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out, reader:
            for start, stop in zip(tiles.bounds, tiles.bounds[1:], strict=False):
                out.write(reader(start, stop, buffer, skip).data)
        os.replace(building, path)
    finally:
        if os.path.exists(building):
            os.unlink(building)


def _root() -> Path:
    root = cache_dir() / "tiles"
    root.mkdir(parents=True, exist_ok=True)
    return root
