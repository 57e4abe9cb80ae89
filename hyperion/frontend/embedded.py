"""Weights embedded in an ONNX model, served as external data without touching the model.

Sessions read external-data weights lazily (mapped, packed, released one at a
time); embedded weights would instead be copied with every segment model and
parsed again by onnxruntime. So large embedded weights become external data:

* a model file (:func:`load_lean`): the protobuf wire format is scanned and,
  for each initializer whose ``raw_data`` is larger than
  ``SMALL_INITIALIZER_BYTES``, the in-memory proto records where those bytes
  sit *in the model file itself* (location = the file's name, offset, length)
  instead of reading them. The file is never written; the process never holds
  the weights, so the cap holds from the moment the model is opened;
* an in-memory model (:func:`spill`): the large weights are written once into
  ``<cache>/weights/<sha256>/weights.bin`` (``HYPERION_CACHE_DIR``, default
  ``~/.cache/hyperion``) and a copy of the proto refers to them.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto

from hyperion.digest import sha256
from hyperion.errors import ModelLoadError

log = logging.getLogger(__name__)

SMALL_INITIALIZER_BYTES = 4096   # smaller weights stay in the proto (shape constants feed inference)
LEAN_LOAD_MIN_BYTES = 1 << 20    # model files from this size on are scanned, not parsed whole
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9     # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_LEN = 2
_HASH_CHUNK_BYTES = 1 << 20


def _varint(buf: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value start, value end, field start) of each field."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _varint(buf, pos)
        elif wire == 1:
            value_end = pos + 8
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            value_end = pos + length
        elif wire == 5:
            value_end = pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire} at byte {field_start}")
        if value_end > end:
            raise ValueError(f"field {number} at byte {field_start} runs past its message")
        yield number, wire, pos, value_end, field_start
        pos = value_end


def load_lean(path: Path) -> tuple[ModelProto, str]:
    """The model at ``path`` with its large embedded weights as references into the file,
    and the file's sha256."""
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            model = _lean_model(buf, path.name)
    except (ValueError, IndexError, OSError, DecodeError) as exc:
        raise ModelLoadError(f"{path}: not an ONNX model ({exc})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph)")
    return model, file_sha256(path)


def file_sha256(path: Path) -> str:
    digest = sha256()
    with path.open("rb") as handle:   # plain reads: the page cache, not this process's RSS
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _lean_model(buf: mmap.mmap, location: str) -> ModelProto:
    rest = bytearray()
    graphs: list[tuple[int, int]] = []
    for number, wire, start, end, field_start in _fields(buf, 0, len(buf)):
        if number == _GRAPH and wire == _LEN:
            graphs.append((start, end))
        else:
            rest += buf[field_start:end]
    model = ModelProto.FromString(bytes(rest))
    for start, end in graphs:   # protobuf merges repeated occurrences of a message field
        graph_rest = bytearray()
        initializers = []
        for number, wire, s, e, field_start in _fields(buf, start, end):
            if number == _INITIALIZER and wire == _LEN:
                initializers.append(_lean_tensor(buf, s, e, location))
            else:
                graph_rest += buf[field_start:e]
        model.graph.MergeFromString(bytes(graph_rest))
        model.graph.initializer.extend(initializers)
    return model


def _lean_tensor(buf: mmap.mmap, start: int, end: int, location: str) -> TensorProto:
    raw: tuple[int, int] | None = None
    rest = bytearray()
    for number, wire, s, e, field_start in _fields(buf, start, end):
        if number == _RAW_DATA and wire == _LEN:
            raw = (s, e)
        else:
            rest += buf[field_start:e]
    if raw is None or raw[1] - raw[0] <= SMALL_INITIALIZER_BYTES:
        return TensorProto.FromString(bytes(buf[start:end]))
    tensor = TensorProto.FromString(bytes(rest))
    refer(tensor, location, raw[0], raw[1] - raw[0])
    return tensor


def refer(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# -- in-memory models ------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("HYPERION_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hyperion"


def weights_folder(sha256: str) -> Path:
    """The cache folder of the model whose sha256 is ``sha256``: its spilled embedded
    weights, and the weights import computes from its constants (:mod:`.fold`)."""
    return cache_dir() / "weights" / sha256


def embedded_weights(initializers: list[TensorProto]) -> list[TensorProto]:
    return [t for t in initializers if t.data_location != TensorProto.EXTERNAL and t.HasField("raw_data")
            and len(t.raw_data) > SMALL_INITIALIZER_BYTES]


def spill(initializers: list[TensorProto], sha256: str) -> tuple[Path, dict[str, TensorProto]]:
    """Write the large embedded weights once to a file keyed by the model's sha256;
    (its folder, a reference proto per weight)."""
    weights = embedded_weights(initializers)
    folder = weights_folder(sha256)
    target = folder / "weights.bin"
    offsets, total = [], 0
    for tensor in weights:
        offsets.append(total)
        total += len(tensor.raw_data)
    if not (target.is_file() and target.stat().st_size == total):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".weights.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                for tensor in weights:
                    handle.write(tensor.raw_data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("spilled %d embedded weights (%d bytes) to %s", len(weights), total, target)
    references: dict[str, TensorProto] = {}
    for tensor, offset in zip(weights, offsets, strict=True):
        reference = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                doc_string=tensor.doc_string)
        refer(reference, target.name, offset, len(tensor.raw_data))
        references[tensor.name] = reference
    return folder, references

