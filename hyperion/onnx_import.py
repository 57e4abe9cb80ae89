"""Import: an ONNX model (path, bytes or ModelProto) into Hyperion's IR.

External data is located (file, offset, length) and checked against the file
size, never read. Shapes come from ``onnx.shape_inference`` with data
propagation, then from onnxruntime's symbolic shape inference where onnx's
leaves a tensor unsized (contrib ops, symbolic arithmetic).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import GraphProto, ModelProto, TensorProto, TypeProto

from hyperion.errors import ModelLoadError, OptionError, ShapeError
from hyperion.ir import ExternalLocation, Graph, NodeInfo, TensorInfo, TensorRole, tensor_nbytes
from hyperion.symbolic_shapes import infer_symbolic

log = logging.getLogger(__name__)

ModelLike = str | os.PathLike | bytes | ModelProto
# Initializers at most this large stay inside the skeleton used for shape
# inference (shape constants feed data propagation); larger ones become typed inputs.
SMALL_INITIALIZER_BYTES = 4096


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


@dataclass
class ImportedModel:
    source: ModelSource
    graph: Graph
    value_types: dict[str, TypeProto]
    input_shapes: dict[str, tuple[int | str, ...]]


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
    from hyperion.embedded import LEAN_LOAD_MIN_BYTES, load_lean
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
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
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
    itemsize = _itemsize(tensor.data_type)
    expected = tensor_nbytes(itemsize, tuple(tensor.dims))
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


# -- shapes ----------------------------------------------------------------------------
def _itemsize(elem_type: int) -> int | None:
    if elem_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def dtype_name(elem_type: int) -> str:
    if elem_type == TensorProto.STRING:
        return "string"
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return TensorProto.DataType.Name(elem_type).lower()


def _dims(type_proto: TypeProto) -> tuple[int | str, ...] | None:
    if type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for i, dim in enumerate(type_proto.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or f"?{i}")
    return tuple(dims)


def _type_facts(type_proto: TypeProto | None) -> tuple[str, tuple[int | str, ...] | None, int | None]:
    if type_proto is None:
        return "unknown", None, None
    kind = type_proto.WhichOneof("value")
    if kind != "tensor_type":
        return kind.removesuffix("_type") if kind else "unknown", None, None
    elem = type_proto.tensor_type.elem_type
    shape = _dims(type_proto)
    return dtype_name(elem), shape, tensor_nbytes(_itemsize(elem), shape)


def _skeleton(proto: ModelProto) -> ModelProto:
    """The model without the bytes of its large weights (they become typed inputs).

    Shape inference copies the whole model; a skeleton keeps that copy small and
    never touches external data.
    """
    skeleton = ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(proto, field))
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    src, graph = proto.graph, skeleton.graph
    graph.name = src.name
    graph.node.extend(src.node)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    initializer_names = {t.name for t in src.initializer}
    graph.input.extend(i for i in src.input if i.name not in initializer_names)
    for tensor in src.initializer:
        small = tensor.data_location != TensorProto.EXTERNAL and tensor.ByteSize() <= SMALL_INITIALIZER_BYTES
        if small:
            graph.initializer.append(tensor)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    graph.sparse_initializer.extend(src.sparse_initializer)
    if skeleton.ir_version < 4:
        skeleton.ir_version = 4  # initializers need not be inputs from IR v4 on
    return skeleton


def _bind_inputs(skeleton: ModelProto, weights: set[str],
                 input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int | str, ...]]:
    real_inputs = {i.name: i for i in skeleton.graph.input if i.name not in weights}
    for name in input_shapes:
        if name not in real_inputs:
            raise OptionError(f"input_shapes: the model has no input {name!r}; its inputs are {sorted(real_inputs)}")
    bound: dict[str, tuple[int | str, ...]] = {}
    for name, value_info in real_inputs.items():
        if name in input_shapes:
            if value_info.type.WhichOneof("value") != "tensor_type":
                # Writing a shape into a sequence/optional type would turn it into a broken tensor type.
                raise OptionError(f"input_shapes: input {name!r} is not a tensor (it is a "
                                  f"{_type_facts(value_info.type)[0]}), so it has no shape to bind")
            tensor_type = value_info.type.tensor_type
            shape = [int(d) for d in input_shapes[name]]
            declared = _dims(value_info.type)
            if declared is not None and len(declared) != len(shape):
                raise OptionError(f"input_shapes: input {name!r} has rank {len(declared)}, got shape {shape}")
            for i, (want, have) in enumerate(zip(shape, declared or shape)):
                if isinstance(have, int) and have != want:
                    raise OptionError(f"input_shapes: dim {i} of input {name!r} is fixed at {have}, got {want}")
            tensor_type.shape.ClearField("dim")
            for d in shape:
                tensor_type.shape.dim.add().dim_value = d
        bound[name] = _dims(value_info.type) or ()
    return bound


def declared_input_shapes(source: ModelSource) -> dict[str, tuple[int | str, ...] | None]:
    """Input shapes as the model file declares them (symbolic dims as names)."""
    weights = {t.name for t in source.proto.graph.initializer}
    return {i.name: _dims(i.type) for i in source.proto.graph.input if i.name not in weights}


def _infer(skeleton: ModelProto, label: str, isolate_symbolic: bool) -> tuple[ModelProto, ModelProto | None]:
    """(onnx's inference, onnxruntime's symbolic inference where onnx's left tensors unsized).

    onnx's result follows the operator specs; onnxruntime's symbolic inference
    sizes more (contrib ops, value-dependent shapes) but can be wrong, e.g. for
    Split lengths computed at run time, so it is only ever an estimate.
    ``isolate_symbolic`` runs the latter in a child process (see
    :mod:`hyperion.symbolic_shapes`).
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        log.info("%s: onnx shape inference failed (%s); trying onnxruntime's", label, exc)
        inferred = skeleton
    if _all_sized(inferred):
        return inferred, None
    return inferred, infer_symbolic(inferred, label, isolated=isolate_symbolic)


def _value_types(certain: ModelProto, estimated: ModelProto | None,
                 declared_outputs: Iterable[onnx.ValueInfoProto]) -> tuple[dict[str, TypeProto], dict[str, TypeProto]]:
    """(types that segment models may declare, types that size tensors for planning).

    A segment model's declared input shapes are checked by onnxruntime against
    the arrays fed, so they come from onnx's inference alone; an estimate from
    onnxruntime's symbolic inference only sizes the plan (or, where onnx found
    nothing, contributes the element type).
    """
    declared: dict[str, TypeProto] = {}
    for value in list(certain.graph.input) + list(certain.graph.value_info) + list(certain.graph.output):
        declared.setdefault(value.name, value.type)
    for value in declared_outputs:  # declared outputs win over inferred guesses
        if value.type.WhichOneof("value") and value.name not in declared:
            declared[value.name] = value.type
    sizing = dict(declared)
    if estimated is None:
        return declared, sizing
    for value in list(estimated.graph.value_info) + list(estimated.graph.output):
        if _type_facts(sizing.get(value.name))[2] is None and _type_facts(value.type)[2] is not None:
            sizing[value.name] = value.type
        if value.name not in declared and value.type.WhichOneof("value") == "tensor_type":
            declared[value.name] = _element_type_only(value.type)
    return declared, sizing


def _element_type_only(type_proto: TypeProto) -> TypeProto:
    return onnx.helper.make_tensor_type_proto(type_proto.tensor_type.elem_type, None)


def _all_sized(model: ModelProto) -> bool:
    known = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.output)}
    for node in model.graph.node:
        for out in node.output:
            if out and (out not in known or _type_facts(known[out])[2] is None):
                return False
    return True


# -- graph ---------------------------------------------------------------------------
def outer_scope_reads(node: onnx.NodeProto) -> list[str]:
    """Tensors that the subgraphs of ``node`` read from enclosing scopes."""
    reads: list[str] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            reads.extend(_free_names(graph))
    return list(dict.fromkeys(reads))


def _free_names(graph: GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    free: list[str] = []
    for node in graph.node:
        for name in list(node.input) + outer_scope_reads(node):
            if name and name not in defined:
                free.append(name)
        defined.update(node.output)
    return free


def _unique_names(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for index, node in enumerate(nodes):
        name = node.name or f"{node.op_type}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        seen.add(name)
        names.append(name)
    return names


def unread_unsized_optional_outputs(proto: ModelProto, sizing: Mapping[str, TypeProto]) -> set[str]:
    """Optional outputs that nothing reads and inference cannot size (an opset-9 Dropout's mask).

    They stay out of the IR, and segment models leave them unrequested, so
    onnxruntime does not compute them: nothing needs them, and a size nobody
    knows could not be accounted under a cap.
    """
    read = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        read.update(node.input)
        read.update(outer_scope_reads(node))
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}
    return {name for node in proto.graph.node for index, name in enumerate(node.output)
            if name and name not in read and _type_facts(sizing.get(name))[2] is None
            and _is_optional_output(node, index, opsets)}


def _is_optional_output(node: onnx.NodeProto, index: int, opsets: Mapping[str, int]) -> bool:
    domain = "" if node.domain == "ai.onnx" else node.domain
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        return False  # an op onnx does not know: its outputs are not ours to drop
    return (index < len(schema.outputs)
            and schema.outputs[index].option == onnx.defs.OpSchema.FormalParameterOption.Optional)


def import_model(source: ModelSource, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                 isolate_symbolic: bool = False) -> ImportedModel:
    """Build the IR of ``source`` with symbolic input dims bound by ``input_shapes``.

    ``isolate_symbolic``: run onnxruntime's symbolic shape inference, when needed, in a
    child process, so that sympy never loads here (compiling under a cap does).
    """
    proto = source.proto
    weights = {t.name: t for t in proto.graph.initializer}
    skeleton = _skeleton(proto)
    bound = _bind_inputs(skeleton, set(weights), input_shapes or {})
    types, sizing = _value_types(*_infer(skeleton, source.label, isolate_symbolic), proto.graph.output)

    node_names = _unique_names(proto.graph.node)
    dropped = unread_unsized_optional_outputs(proto, sizing)
    producers: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    nodes: list[NodeInfo] = []
    for index, (name, node) in enumerate(zip(node_names, proto.graph.node)):
        inputs = tuple(dict.fromkeys([i for i in node.input if i] + outer_scope_reads(node)))
        outputs = tuple(o for o in node.output if o and o not in dropped)
        nodes.append(NodeInfo(name, node.op_type, node.domain, inputs, outputs, index))
        for tensor in inputs:
            consumers.setdefault(tensor, []).append(name)
        for tensor in outputs:
            producers[tensor] = name

    graph_outputs = tuple(o.name for o in proto.graph.output)
    graph_inputs = tuple(name for name in bound)
    tensors: dict[str, TensorInfo] = {}
    known = set(graph_inputs) | set(weights) | set(producers)
    for node in nodes:
        for tensor in node.inputs:
            if tensor not in known:
                raise ModelLoadError(f"{source.label}: node {node.name!r} reads tensor {tensor!r}, "
                                     "which no node, input or initializer defines")
    for name in list(dict.fromkeys(list(graph_inputs) + list(weights) + list(producers))):
        if name in weights:
            init = weights[name]
            shape = tuple(int(d) for d in init.dims)
            external = (external_location(source, init)
                        if init.data_location == TensorProto.EXTERNAL else None)
            tensors[name] = TensorInfo(name, dtype_name(init.data_type), shape,
                                       tensor_nbytes(_itemsize(init.data_type), shape), TensorRole.WEIGHT,
                                       None, tuple(consumers.get(name, ())), external)
            continue
        dtype, shape, nbytes = _type_facts(sizing.get(name))
        role = (TensorRole.INPUT if name in bound
                else TensorRole.OUTPUT if name in graph_outputs else TensorRole.ACTIVATION)
        tensors[name] = TensorInfo(name, dtype, shape, nbytes, role, producers.get(name),
                                   tuple(consumers.get(name, ())))
    for name in graph_outputs:
        if name not in tensors:
            raise ModelLoadError(f"{source.label}: graph output {name!r} is produced by no node")
    graph = Graph(nodes, tensors, graph_inputs, graph_outputs)
    return ImportedModel(source, graph, types, bound)


def unbound_dims(imported: ImportedModel) -> dict[str, list[str]]:
    """Symbolic dims of each graph input that no shape binds yet."""
    return {name: [d for d in shape if isinstance(d, str)]
            for name, shape in imported.input_shapes.items() if any(isinstance(d, str) for d in shape)}


def require_bound(imported: ImportedModel) -> None:
    unbound = unbound_dims(imported)
    if unbound:
        name, dims = next(iter(unbound.items()))
        raise ShapeError(
            f"{imported.source.label}: input {name!r} has unbound symbolic dim(s) {dims}; "
            f"give input_shapes={{'{name}': [...]}} (CLI: --input-shape {name}=1x...) or run with feeds")
