"""The model's weights: as the initializers segment models carry, and as arrays.

Segment models carry external-data weights as references, which onnxruntime
reads when a session is created. Large weights embedded in an in-memory model
are spilled once to a Hyperion-owned file (:mod:`hyperion.frontend.embedded`) when the
schedule streams weights, so they are read the same way; ``folder`` is where
relative locations resolve.

As arrays (a graph output that is a weight), external-data weights are read
with one positioned read each (``np.fromfile`` at an offset); embedded weights
are decoded from the model proto.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from onnx import TensorProto, numpy_helper

from hyperion.errors import ModelLoadError
from hyperion.frontend import ModelSource
from hyperion.frontend.embedded import embedded_weights, spill
from hyperion.frontend.source import external_location
from hyperion.schedule import TensorRecord

log = logging.getLogger(__name__)


class WeightStore:
    def __init__(self, source: ModelSource, tensors: Mapping[str, TensorRecord]) -> None:
        self.source = source
        self.records = tensors
        self.protos: dict[str, TensorProto] = {t.name: t for t in source.proto.graph.initializer}
        self._embedded = dict(self.protos)   # the originals, for reading arrays
        self.folder: Path = source.base_dir

    def spill_embedded(self) -> bool:
        """Serve large embedded weights of an in-memory model from a spilled file.

        Only for models without external data of their own (one folder must hold
        every file a session reads). Returns whether anything was spilled.
        """
        initializers = list(self.source.proto.graph.initializer)
        if self.source.path is not None or not embedded_weights(initializers):
            return False
        if any(t.data_location == TensorProto.EXTERNAL for t in initializers):
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
