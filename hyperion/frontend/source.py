"""The user's model as given: a path, bytes or a ModelProto, never modified.

External data is located (file, offset, length) and checked against the file
size, never read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto

from hyperion.errors import ModelLoadError
from hyperion.frontend.types import itemsize
from hyperion.ir import DEFAULT_DOMAIN, ExternalLocation, normalise_domain, tensor_nbytes

ModelLike = str | os.PathLike | bytes | ModelProto


@dataclass
class ModelSource:
    """The user's model as given: never modified, external data never loaded."""

    proto: ModelProto
    path: Path | None
    base_dir: Path
    sha256: str
    opset: int

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<in-memory model>"



def load_source(model: ModelLike) -> ModelSource:
    if isinstance(model, ModelProto):
        data = model.SerializeToString()
        return _source(model, None, Path.cwd(), hashlib.sha256(data).hexdigest())
    if isinstance(model, bytes | bytearray):
        proto = _parse(bytes(model), "<bytes>")
        return _source(proto, None, Path.cwd(), hashlib.sha256(model).hexdigest())
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    from hyperion.frontend.embedded import LEAN_LOAD_MIN_BYTES, load_lean
    if path.stat().st_size >= LEAN_LOAD_MIN_BYTES:  # large weights stay in the file, never read here
        proto, sha256 = load_lean(path)
        return _source(proto, path.resolve(), path.resolve().parent, sha256)
    data = path.read_bytes()
    proto = _parse(data, str(path))
    return _source(proto, path.resolve(), path.resolve().parent, hashlib.sha256(data).hexdigest())


def _parse(data: bytes, label: str) -> ModelProto:
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise ModelLoadError(f"{label}: not an ONNX model ({exc})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{label}: not an ONNX model (no graph)")
    return proto


def _source(proto: ModelProto, path: Path | None, base_dir: Path, sha: str) -> ModelSource:
    opset = next((o.version for o in proto.opset_import if normalise_domain(o.domain) == DEFAULT_DOMAIN), 0)
    source = ModelSource(proto, path, base_dir, sha, opset)
    for tensor in proto.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            external_location(source, tensor)  # validates file and length now, reads nothing
    return source


def external_location(source: ModelSource, tensor: TensorProto) -> ExternalLocation:
    info = {e.key: e.value for e in tensor.external_data}
    if "location" not in info:
        raise ModelLoadError(f"{source.label}: weight {tensor.name!r} is external but names no file")
    file = (source.base_dir / info["location"]).resolve()
    offset = int(info.get("offset", 0))
    size_of_item = itemsize(tensor.data_type)
    expected = tensor_nbytes(size_of_item, tuple(tensor.dims))
    length = int(info["length"]) if "length" in info else (expected or 0)
    if not file.is_file():
        raise ModelLoadError(f"{source.label}: external data file {file} of weight {tensor.name!r} is missing")
    size = file.stat().st_size
    if offset + length > size:
        raise ModelLoadError(
            f"{file}: truncated external data: weight {tensor.name!r} needs bytes "
            f"{offset}..{offset + length}, the file has {size}")
    if expected is not None and length != expected:
        raise ModelLoadError(
            f"{file}: weight {tensor.name!r} has {length} bytes of external data, its shape needs {expected}")
    return ExternalLocation(str(file), offset, length)


