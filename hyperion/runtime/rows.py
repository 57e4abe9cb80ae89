"""Row gathers: a Gather over a weight table that reads only the rows its indices name.

The schedule marks the step (``Step.row_gather``); the runtime runs it here instead
of in a session. The distinct rows named are read with positioned reads -- one
``preadv`` per run of adjacent rows, straight into a compact buffer -- and the
Gather is computed on that compact table with the indices remapped onto it.

Why not map the table: on Linux a mapped file is faulted in large page-cache
folios, so reading 128 random 3 KB rows of a mapped 147 MiB table raised RSS by
122 MiB (with or without ``MADV_RANDOM``). A positioned read copies exactly the
bytes asked for into anonymous memory; the page cache does not count in RSS.

Why numpy for the gather: Gather copies rows and computes nothing, so ``take`` on
the compact table gives onnxruntime's bytes exactly, with no session to build.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hyperion.errors import ModelLoadError, RuntimeExecutionError
from hyperion.schedule import RowGather


def normalised_indices(gather: RowGather, node: str, indices: np.ndarray) -> np.ndarray:
    """``indices`` as int64 in ``[0, rows)``: negative ones count from the end, as in
    onnxruntime; one outside ``[-rows, rows)`` is an error, as in onnxruntime."""
    flat = np.asarray(indices).astype(np.int64, copy=False).reshape(-1)
    rows = gather.rows
    bad = (flat < -rows) | (flat >= rows)
    if bad.any():
        value = int(flat[np.argmax(bad)])
        raise RuntimeExecutionError(
            f"node {node!r}: indices {gather.indices!r} element out of data bounds, idx={value} must be within "
            f"the inclusive range [{-rows},{rows - 1}] (rows of {gather.weight!r})")
    return np.where(flat < 0, flat + rows, flat)


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted distinct ``rows`` as (first row, row count) runs of adjacent rows."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [rows.size]))
    return [(int(rows[a]), int(b - a)) for a, b in zip(starts, stops, strict=True)]


def read_rows(path: Path, offset: int, gather: RowGather, rows: np.ndarray, dtype: np.dtype,
              row_shape: tuple[int, ...]) -> np.ndarray:
    """Rows ``rows`` (sorted, distinct) of the table at ``offset`` in ``path``, in one buffer."""
    compact = np.empty((rows.size, *row_shape), dtype)
    buffer = memoryview(compact.reshape(-1).view(np.uint8))
    row_bytes = gather.row_bytes
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read weight {gather.weight!r}: {exc.strerror or exc}") from None
    try:
        position = 0
        for first, count in row_runs(rows):
            wanted = count * row_bytes
            done = os.preadv(fd, [buffer[position:position + wanted]], offset + first * row_bytes)
            if done != wanted:
                raise ModelLoadError(f"{path}: truncated external data for weight {gather.weight!r}: "
                                     f"rows {first}..{first + count - 1} are not all there")
            position += wanted
    finally:
        os.close(fd)
    return compact


def gather_rows(gather: RowGather, node: str, indices: np.ndarray, dtype: np.dtype, row_shape: tuple[int, ...],
                path: Path | None, offset: int, table: np.ndarray | None = None) -> np.ndarray:
    """Gather(table, indices, axis=0) reading only the rows named: from ``path`` at
    ``offset``, or from ``table`` when the weight has no file (kept in the model proto)."""
    flat = normalised_indices(gather, node, indices)
    distinct, inverse = np.unique(flat, return_inverse=True)
    if path is None:
        assert table is not None
        compact = table[distinct]
    else:
        compact = read_rows(path, offset, gather, distinct, dtype, row_shape)
    return np.take(compact, inverse.reshape(np.shape(indices)), axis=0)
