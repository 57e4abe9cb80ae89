"""The user's model as given: a path, bytes or a ModelProto, never modified.

External data is located (file, offset, length) and checked against the file
size, never read. Every location goes through :func:`resolve_external`, the one
place that decides whether a file may be opened: inside the model's folder, or
refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import ModelProto, TensorProto, numpy_helper

from hyperion import digest
from hyperion.errors import ModelLoadError, OptionError, UnsafeModelError
from hyperion.frontend.types import itemsize
from hyperion.ir import DEFAULT_DOMAIN, ExternalLocation, normalise_domain, tensor_nbytes
from hyperion.units import MAX_TENSOR_BYTES

ModelLike = str | os.PathLike | bytes | ModelProto


@dataclass
class ModelSource:
    """The user's model as given: never modified, external data never loaded."""

    proto: ModelProto
    path: Path | None
    base_dir: Path
    sha256: str
    opset: int
    # Weights import computed from constants (hyperion.frontend.fold): in ``proto`` they are
    # initializers, in the user's model the outputs of nodes onnxruntime would fold itself.
    computed_weights: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<in-memory model>"



def load_source(model: ModelLike, base_dir: str | os.PathLike | None = None, *,
                fold_constants: bool = True) -> ModelSource:
    """The model as given. ``base_dir`` is where the external data of a model given as
    bytes or a ``ModelProto`` lives; required when it has any (a model file's folder is
    its own, and ``base_dir`` must then be left out or name that folder).

    ``fold_constants``: large tensors the model computes from constants alone are
    computed now, once, and served as weights from Hyperion's cache (:mod:`.fold`)."""
    source = _load_source(model, base_dir)
    if not fold_constants:
        return source
    from hyperion.frontend.fold import fold_constants as fold  # fold builds on this module
    return fold(source)


def _load_source(model: ModelLike, base_dir: str | os.PathLike | None) -> ModelSource:
    folder = _base_dir(base_dir)
    if isinstance(model, ModelProto):
        data = model.SerializeToString()
        return _source(model, None, folder, digest.sha256(data).hexdigest())
    if isinstance(model, bytes | bytearray):
        proto = _parse(bytes(model), "<bytes>")
        return _source(proto, None, folder, digest.sha256(model).hexdigest())
    if not isinstance(model, str | os.PathLike):
        raise OptionError(f"model: expected a path, bytes or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        what = "a folder, not a model file" if path.is_dir() else "no such model file"
        raise ModelLoadError(f"{path}: {what}")
    if folder is not None and folder != path.resolve().parent:
        raise OptionError(f"base_dir: {path}'s external data is in its own folder {path.resolve().parent}, "
                          f"not {folder}; leave base_dir out for a model file")
    from hyperion.frontend.embedded import LEAN_LOAD_MIN_BYTES, load_lean
    try:
        if path.stat().st_size >= LEAN_LOAD_MIN_BYTES:  # large weights stay in the file, never read here
            proto, sha256 = load_lean(path.resolve())
            return _source(proto, path.resolve(), path.resolve().parent, sha256)
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the model file ({exc.strerror or exc})") from None
    proto = _parse(data, str(path))
    return _source(proto, path.resolve(), path.resolve().parent, digest.sha256(data).hexdigest())


def _base_dir(base_dir: str | os.PathLike | None) -> Path | None:
    if base_dir is None:
        return None
    if not isinstance(base_dir, str | os.PathLike) or not Path(base_dir).is_dir():
        raise OptionError(f"base_dir: {base_dir!r} is not a folder; give the folder that holds the model's "
                          "external data")
    return Path(base_dir).resolve()


def _parse(data: bytes, label: str) -> ModelProto:
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise ModelLoadError(f"{label}: not an ONNX model ({exc})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{label}: not an ONNX model (no graph)")
    return proto


def _source(proto: ModelProto, path: Path | None, base_dir: Path | None, sha: str) -> ModelSource:
    label = str(path) if path else "<in-memory model>"
    try:
        _check_text(proto)
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{label}: not a valid ONNX model: a name or string in it is not UTF-8 ({exc})") from None
    opset = next((o.version for o in proto.opset_import if normalise_domain(o.domain) == DEFAULT_DOMAIN), 0)
    source = ModelSource(proto, path, base_dir or Path.cwd(), sha, opset)
    external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external and base_dir is None:
        raise ModelLoadError(
            f"{source.label}: weight {external[0].name!r} is stored as external data, and a model given as "
            "bytes or a ModelProto has no folder of its own; pass base_dir= (the folder that holds its data "
            "files), or give the model's path")
    for tensor in proto.graph.initializer:
        _check_dims(source, tensor)
        if tensor.data_location == TensorProto.EXTERNAL:
            external_location(source, tensor)  # validates file and length now, reads nothing
    return source


def _check_text(message: Message) -> None:
    """Raise UnicodeDecodeError if a string field of ``message`` is not UTF-8 (protobuf then
    hands back bytes, which fail wherever they are first used as text); tensors' data is
    not touched."""
    stack = [message]
    while stack:
        current = stack.pop()
        if isinstance(current, TensorProto):
            texts = [current.name, current.doc_string]
            stack.extend(current.external_data)
        else:
            texts = []
            for field, value in current.ListFields():
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    stack.extend(value if _repeated(field) else [value])
                elif field.type == FieldDescriptor.TYPE_STRING:
                    texts.extend(value if _repeated(field) else [value])
        for text in texts:
            if isinstance(text, bytes):
                text.decode("utf-8")   # raises, naming the byte at fault


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


# Element types stored one whole number of bytes per element in raw_data (not the packed 4-bit ones).
_WHOLE_BYTE_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
    TensorProto.COMPLEX64, TensorProto.COMPLEX128})


def _check_dims(source: ModelSource, tensor: TensorProto) -> None:
    """Declared dims that are negative or would need absurd memory are refused before
    anything is sized or allocated from them."""
    dims = tuple(tensor.dims)
    if tensor.data_type not in TensorProto.DataType.values():
        raise ModelLoadError(f"{source.label}: weight {tensor.name!r} has element type {tensor.data_type}, "
                             "which ONNX does not define")
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"{source.label}: weight {tensor.name!r} declares negative dims {list(dims)}")
    nbytes = tensor_nbytes(itemsize(tensor.data_type) or 1, dims) or 0
    if nbytes > MAX_TENSOR_BYTES:
        raise ModelLoadError(f"{source.label}: weight {tensor.name!r} declares dims {list(dims)}, "
                             f"{nbytes} bytes: more than Hyperion accepts for one tensor ({MAX_TENSOR_BYTES})")
    if tensor.data_location == TensorProto.EXTERNAL:
        return
    if tensor.HasField("raw_data") and tensor.data_type in _WHOLE_BYTE_TYPES:
        if len(tensor.raw_data) != nbytes:
            raise ModelLoadError(f"{source.label}: weight {tensor.name!r} declares dims {list(dims)} "
                                 f"({nbytes} bytes) but holds {len(tensor.raw_data)} bytes")
        return
    try:  # typed fields (float_data, string_data, ...) or packed types: decode once to check
        numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises ValueError, TypeError, KeyError... for data that does not fit
        raise ModelLoadError(f"{source.label}: weight {tensor.name!r} (dims {list(dims)}) holds data that does "
                             f"not match its dims or type: {exc}") from None


def resolve_external(base_dir: Path, location: str, tensor: str, *, label: str | None = None) -> Path:
    """The file an external-data ``location`` names, resolved (symbolic links followed);
    refused unless it stays inside ``base_dir``, the model's folder, as onnxruntime
    requires. Every place that opens an external-data file asks here first."""
    where = label or str(base_dir)
    text = location.replace("\\", "/")
    if not location or "\0" in location:
        raise ModelLoadError(f"{where}: weight {tensor!r} is external but names no usable file ({location!r})")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
        raise UnsafeModelError(
            f"{where}: weight {tensor!r} names external data at the absolute path {location!r}; refused: "
            "external data must be a relative path inside the model's folder", tensor=tensor, location=location)
    if ".." in PurePosixPath(text).parts:
        raise UnsafeModelError(
            f"{where}: weight {tensor!r} names external data at {location!r}, which leaves the model's folder "
            "('..'); refused: external data must stay inside the model's folder", tensor=tensor, location=location)
    try:
        root = base_dir.resolve()
        file = (root / text).resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop
        raise ModelLoadError(f"{where}: external data {location!r} of weight {tensor!r} cannot be resolved "
                             f"({exc})") from None
    if not file.is_relative_to(root):
        raise UnsafeModelError(
            f"{where}: weight {tensor!r} names external data at {location!r}, which resolves to {file}, outside "
            f"the model's folder {root} (a symbolic link out of it); refused", tensor=tensor, location=location)
    return file


def external_location(source: ModelSource, tensor: TensorProto) -> ExternalLocation:
    info = {e.key: e.value for e in tensor.external_data}
    if "location" not in info:
        raise ModelLoadError(f"{source.label}: weight {tensor.name!r} is external but names no file")
    file = resolve_external(source.base_dir, info["location"], tensor.name, label=source.label)
    offset = _byte_count(source, tensor, info, "offset")
    size_of_item = itemsize(tensor.data_type)
    expected = tensor_nbytes(size_of_item, tuple(tensor.dims))
    length = _byte_count(source, tensor, info, "length") if "length" in info else (expected or 0)
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


def _byte_count(source: ModelSource, tensor: TensorProto, info: dict[str, str], key: str) -> int:
    """An external-data ``offset`` or ``length``: a non-negative decimal integer."""
    text = info.get(key, "0").strip()
    if not text.isdigit() or not text.isascii() or len(text) > 20:
        raise ModelLoadError(f"{source.label}: weight {tensor.name!r} has external-data {key} {info.get(key)!r}; "
                             "expected a non-negative integer (bytes)")
    return int(text)
