"""Weights as numpy arrays, read when the schedule says and not before.

External-data weights are read with one positioned read each (``np.fromfile``
at an offset) into memory Hyperion owns, so a weight stops counting in the
process's RSS as soon as it is released. Embedded weights are decoded from the
model proto.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from onnx import TensorProto, numpy_helper

from hyperion.errors import ModelLoadError
from hyperion.onnx_import import ModelSource
from hyperion.schedule import TensorRecord


class WeightStore:
    def __init__(self, source: ModelSource, tensors: Mapping[str, TensorRecord]) -> None:
        self.source = source
        self.records = tensors
        self.protos: dict[str, TensorProto] = {t.name: t for t in source.proto.graph.initializer}

    def read(self, name: str) -> np.ndarray:
        record = self.records[name]
        if record.external is not None:
            return self._read_external(record)
        return numpy_helper.to_array(self.protos[name])

    def read_many(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in names}

    def _read_external(self, record: TensorRecord) -> np.ndarray:
        location = record.external or {}
        dtype = np.dtype(record.dtype)
        shape = tuple(int(d) for d in record.shape or ())
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        try:
            data = np.fromfile(location["path"], dtype=dtype, count=count, offset=location["offset"])
        except OSError as exc:
            raise ModelLoadError(f"{location['path']}: cannot read weight {record.name!r}: {exc}") from None
        if data.size != count:
            raise ModelLoadError(f"{location['path']}: truncated external data for weight {record.name!r}: "
                                 f"expected {count} values, read {data.size}")
        return data.reshape(shape)
