"""The model's weights: as the initializers segment models carry, and as arrays.

Segment models carry external-data weights as references, which onnxruntime
reads when a session is created. Large weights embedded in an in-memory model
are spilled once to a Hyperion-owned file (:mod:`hyperion.frontend.embedded`) when the
schedule streams weights, so they are read the same way; ``folder`` is where
relative locations resolve.

As arrays (a graph output that is a weight), external-data weights are read
with one positioned read each (``np.fromfile`` at an offset); embedded weights
are decoded from the model proto.

Fed to a session (a segment's ``fed_weights``), a weight is a read-only numpy
view of its file, mapped once per file for the store's life: onnxruntime uses
a C-contiguous numpy array's buffer in place on CPU, so the bytes are never
copied; they are read when the kernel touches them (page-cache hits on later
runs). File-backed pages count in RSS while they are mapped in, so after its
segment a weight's pages are dropped with ``madvise(MADV_DONTNEED)``: RSS falls
back, and the next run faults them in again from the page cache.
``MADV_WILLNEED`` starts the kernel's read-ahead of the next segment's weights
while the current one computes; read-ahead fills the page cache, not this
process's RSS.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, numpy_helper

from hyperion.errors import ModelLoadError
from hyperion.frontend import ModelSource
from hyperion.frontend.embedded import embedded_weights, spill, weights_folder
from hyperion.frontend.source import external_location
from hyperion.schedule import TensorRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileSpan:
    """A weight's bytes: which file, where."""

    path: Path
    offset: int
    length: int


class WeightStore:
    def __init__(self, source: ModelSource, tensors: Mapping[str, TensorRecord]) -> None:
        self.source = source
        self.records = tensors
        self.protos: dict[str, TensorProto] = {t.name: t for t in source.proto.graph.initializer}
        self._embedded = dict(self.protos)   # the originals, for reading arrays
        self.folder: Path = source.base_dir
        self._maps: dict[Path, mmap.mmap] = {}
        self._spans: dict[str, FileSpan | None] = {}
        self.fed_bytes = 0                   # bytes handed to sessions as mapped views, since the last reset

    # -- weights fed to sessions -------------------------------------------------------------
    def view(self, name: str) -> np.ndarray:
        """``name`` as a read-only array over its mapped file: no copy is made."""
        record = self.records[name]
        span = self.span(name)
        if span is None:  # embedded in a model that also has external data: decoded, a copy
            return numpy_helper.to_array(self._embedded[name])
        return self.view_span(span, np.dtype(record.dtype), tuple(int(d) for d in record.shape or ()))

    def view_span(self, span: FileSpan, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The bytes of ``span`` as a read-only array over its mapped file: no copy is made."""
        self.fed_bytes += span.length
        return np.frombuffer(self._map(span.path), dtype=dtype, count=span.length // dtype.itemsize,
                             offset=span.offset).reshape(shape)

    def close(self) -> None:
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:  # a caller still holds a view: the mapping goes with it
                pass
        self._maps.clear()

    def advise(self, spans: Iterable[FileSpan], advice: int) -> None:
        """``madvise`` the mapped pages of ``spans``: ``mmap.MADV_DONTNEED`` drops them from this
        process (they stay in the page cache), ``MADV_WILLNEED`` starts reading them ahead."""
        page = mmap.PAGESIZE
        for span in spans:
            if span.length == 0:
                continue
            start = span.offset - span.offset % page  # madvise wants a page-aligned start
            self._map(span.path).madvise(advice, start, span.offset + span.length - start)

    def _map(self, path: Path) -> mmap.mmap:
        mapping = self._maps.get(path)
        if mapping is None:
            try:
                with path.open("rb") as handle:
                    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"{path}: cannot map external data: {exc}") from None
            self._maps[path] = mapping
        return mapping

    def span(self, name: str) -> FileSpan | None:
        """Where ``name``'s bytes are: where the model says (contained in its folder, as
        :meth:`read` checks too), or the file it was spilled to. Found once per weight."""
        if name not in self._spans:
            self._spans[name] = self._locate(name)
        return self._spans[name]

    def _locate(self, name: str) -> FileSpan | None:
        if self.records[name].external is not None:
            location = external_location(self.source, self._embedded[name])
            return FileSpan(Path(location.path), location.offset, location.length)
        proto = self.protos[name]
        if proto.data_location != TensorProto.EXTERNAL:
            return None
        info = {entry.key: entry.value for entry in proto.external_data}
        return FileSpan(self.folder / info["location"], int(info.get("offset", 0)), int(info["length"]))

    def spill_embedded(self) -> bool:
        """Serve large embedded weights of an in-memory model from a spilled file.

        Only for models without external data of their own (one folder must hold
        every file a session reads; weights computed from constants at import are in
        the spill's folder already). Returns whether anything was spilled.
        """
        initializers = list(self.source.proto.graph.initializer)
        if self.source.path is not None or not embedded_weights(initializers):
            return False
        folder = weights_folder(self.source.sha256)
        # Weights import computed from constants are in that same folder: the spill joins them.
        if self.source.base_dir != folder and any(t.data_location == TensorProto.EXTERNAL for t in initializers):
            log.info("%s: embedded weights stay in the proto: the model also has external data",
                     self.source.label)
            return False
        self.folder, references = spill(initializers, self.source.sha256)
        self.protos.update(references)
        return True

    def read(self, name: str) -> np.ndarray:
        record = self.records[name]
        if record.external is not None:
            return self._read_external(record)
        return numpy_helper.to_array(self._embedded[name])

    def _read_external(self, record: TensorRecord) -> np.ndarray:
        location = external_location(self.source, self._embedded[record.name])  # contained, as the model says
        dtype = np.dtype(record.dtype)
        shape = tuple(int(d) for d in record.shape or ())
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        try:
            data = np.fromfile(location.path, dtype=dtype, count=count, offset=location.offset)
        except OSError as exc:
            raise ModelLoadError(f"{location.path}: cannot read weight {record.name!r}: {exc}") from None
        if data.size != count:
            raise ModelLoadError(f"{location.path}: truncated external data for weight {record.name!r}: "
                                 f"expected {count} values, read {data.size}")
        return data.reshape(shape)
