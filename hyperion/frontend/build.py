"""IR construction: nodes with stable unique names, the tensor table, roles.

Tensors that subgraphs (If / Loop / Scan bodies) read from the outer scope
count as inputs of the node that owns the subgraph. Node attributes become plain
Python values and small constants numpy arrays, so that passes never read protobuf;
domains are normalised (``""`` for the default ONNX domain).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, TypeProto, numpy_helper

from hyperion.errors import ModelLoadError, ShapeError
from hyperion.frontend.shapes import (
    bind_inputs,
    infer_types,
    skeleton_of,
    split_value_types,
)
from hyperion.frontend.source import ModelSource, external_location
from hyperion.frontend.types import dtype_name, itemsize, type_facts
from hyperion.ir import (
    SMALL_TENSOR_BYTES,
    AttributeValue,
    Graph,
    NodeInfo,
    TensorInfo,
    TensorRole,
    normalise_domain,
    tensor_nbytes,
)
from hyperion.units import MAX_TENSOR_BYTES


@dataclass
class ImportedModel:
    source: ModelSource
    graph: Graph
    value_types: dict[str, TypeProto]
    input_shapes: dict[str, tuple[int | str, ...]]



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


def unique_node_names(nodes: Iterable[onnx.NodeProto]) -> list[str]:
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
    opsets = {normalise_domain(o.domain): o.version for o in proto.opset_import}
    return {name for node in proto.graph.node for index, name in enumerate(node.output)
            if name and name not in read and type_facts(sizing.get(name))[2] is None
            and _is_optional_output(node, index, opsets)}


def _is_optional_output(node: onnx.NodeProto, index: int, opsets: Mapping[str, int]) -> bool:
    domain = normalise_domain(node.domain)
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        return False  # an op onnx does not know: its outputs are not ours to drop
    return (index < len(schema.outputs)
            and schema.outputs[index].option == onnx.defs.OpSchema.FormalParameterOption.Optional)


def _small_array(tensor: TensorProto) -> np.ndarray | None:
    """The value of ``tensor`` if it is stored in the file and at most SMALL_TENSOR_BYTES."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return None  # never read here: external data stays where it is
    nbytes = tensor_nbytes(itemsize(tensor.data_type), tuple(tensor.dims))
    if nbytes is None or nbytes > SMALL_TENSOR_BYTES:
        return None
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # data that does not match its dims or type
        raise ModelLoadError(f"tensor {tensor.name!r} (dims {list(tensor.dims)}) holds data that does not "
                             f"match its dims or type: {exc}") from None


def _attribute_value(attr: AttributeProto) -> AttributeValue | None:
    """``attr`` as plain Python; None for what the IR does not carry (subgraphs, large tensors)."""
    if attr.type == AttributeProto.TENSOR:
        return _small_array(attr.t)
    if attr.type == AttributeProto.STRING:
        return attr.s.decode("utf-8", errors="replace")
    if attr.type == AttributeProto.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in attr.strings]
    if attr.type in (AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.INTS, AttributeProto.FLOATS):
        return onnx.helper.get_attribute_value(attr)  # an int, a float, or a list of them
    return None


def node_attributes(node: onnx.NodeProto) -> dict[str, AttributeValue]:
    values = {attr.name: _attribute_value(attr) for attr in node.attribute}
    return {name: value for name, value in values.items() if value is not None}


def small_constants(proto: ModelProto, nodes: Sequence[NodeInfo]) -> dict[str, np.ndarray]:
    """Values of initializers stored in the file and of ``Constant`` outputs, up to
    SMALL_TENSOR_BYTES each: the axes, shapes and pads passes read."""
    values: dict[str, np.ndarray] = {}
    for tensor in proto.graph.initializer:
        value = _small_array(tensor)
        if value is not None:
            values[tensor.name] = value
    for node in nodes:
        if node.op_type == "Constant" and node.is_default_domain and node.outputs:
            value = _constant_value(node)
            if value is not None and value.nbytes <= SMALL_TENSOR_BYTES:
                values[node.outputs[0]] = value
    return values


_CONSTANT_LIST_ATTRIBUTES = ("value_ints", "value_int", "value_floats", "value_float")


def _constant_value(node: NodeInfo) -> np.ndarray | None:
    value = node.attributes.get("value")
    if isinstance(value, np.ndarray):
        return value
    for name in _CONSTANT_LIST_ATTRIBUTES:
        if name in node.attributes:
            return np.asarray(node.attributes[name])
    return None


def _undefined_elem_type(type_proto: TypeProto) -> int | None:
    """An element type number in ``type_proto`` (nested types included) that ONNX does not define."""
    defined = TensorProto.DataType.values()
    stack = [type_proto]
    while stack:
        current = stack.pop()
        kind = current.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            elem = getattr(current, kind).elem_type
            if elem not in defined:
                return elem
        elif kind in ("sequence_type", "optional_type"):
            stack.append(getattr(current, kind).elem_type)
        elif kind == "map_type":
            if current.map_type.key_type not in defined:
                return current.map_type.key_type
            stack.append(current.map_type.value_type)
    return None


def _refuse_absurd_declared_sizes(skeleton: ModelProto, label: str) -> None:
    """Declared inputs, outputs and value infos needing more than MAX_TENSOR_BYTES are refused
    before shape inference, whose data propagation would try to allocate them."""
    graph = skeleton.graph
    for info in (*graph.input, *graph.output, *graph.value_info):
        undefined = _undefined_elem_type(info.type)
        if undefined is not None:
            raise ModelLoadError(f"{label}: tensor {info.name!r} is declared with element type {undefined}, "
                                 "which ONNX does not define")
        dtype, shape, nbytes = type_facts(info.type)
        dims = [d for d in shape or () if isinstance(d, int)]
        if (nbytes or 0) > MAX_TENSOR_BYTES or math.prod(dims) > MAX_TENSOR_BYTES:
            raise ShapeError(f"{label}: tensor {info.name!r} is declared {dtype}{list(shape or ())}: more than "
                             f"Hyperion accepts for one tensor ({MAX_TENSOR_BYTES} bytes); check the model's "
                             "declared dims and input_shapes")


def import_model(source: ModelSource, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                 isolate_symbolic: bool = False, estimate: bool = True) -> ImportedModel:
    """Build the IR of ``source`` with symbolic input dims bound by ``input_shapes``.

    ``isolate_symbolic``: run onnxruntime's symbolic shape inference, when needed, in a
    child process, so that sympy never loads here (compiling under a cap does).
    ``estimate=False``: onnx's shape inference alone, never onnxruntime's (a re-planned
    rest of a model tries that first: it is the fast way, see hyperion.frontend.suffix).
    """
    proto = source.proto
    weights = {t.name: t for t in proto.graph.initializer}
    skeleton = skeleton_of(proto)
    bound = bind_inputs(skeleton, set(weights), input_shapes or {})
    _refuse_absurd_declared_sizes(skeleton, source.label)
    inferred = infer_types(skeleton, source.label, isolate_symbolic, estimate)
    types, sizing = split_value_types(*inferred, proto.graph.output)

    node_names = unique_node_names(proto.graph.node)
    dropped = unread_unsized_optional_outputs(proto, sizing)
    producers: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    nodes: list[NodeInfo] = []
    for index, (name, node) in enumerate(zip(node_names, proto.graph.node, strict=True)):
        inputs = tuple(dict.fromkeys([i for i in node.input if i] + outer_scope_reads(node)))
        outputs = tuple(o for o in node.output if o and o not in dropped)
        nodes.append(NodeInfo(name, node.op_type, normalise_domain(node.domain), inputs, outputs, index,
                              input_slots=tuple(node.input), output_slots=tuple(node.output),
                              attributes=node_attributes(node)))
        for tensor in inputs:
            consumers.setdefault(tensor, []).append(name)
        for tensor in outputs:
            if tensor in producers or tensor in weights or tensor in bound:
                first = f"node {producers[tensor]!r}" if tensor in producers else "a graph input or initializer"
                raise ModelLoadError(f"{source.label}: tensor {tensor!r} is produced by both {first} and node "
                                     f"{name!r}; every tensor of an ONNX graph has one producer")
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
            dims = tuple(int(d) for d in init.dims)
            external = (external_location(source, init)
                        if init.data_location == TensorProto.EXTERNAL else None)
            tensors[name] = TensorInfo(name, dtype_name(init.data_type), dims,
                                       tensor_nbytes(itemsize(init.data_type), dims), TensorRole.WEIGHT,
                                       None, tuple(consumers.get(name, ())), external)
            continue
        dtype, shape, nbytes = type_facts(sizing.get(name))
        if nbytes is not None and nbytes > MAX_TENSOR_BYTES:
            raise ShapeError(f"{source.label}: tensor {name!r} has shape {list(shape or ())}, {nbytes} bytes: more "
                             f"than Hyperion accepts for one tensor ({MAX_TENSOR_BYTES}); check the model's "
                             "declared dims and input_shapes")
        role = (TensorRole.INPUT if name in bound
                else TensorRole.OUTPUT if name in graph_outputs else TensorRole.ACTIVATION)
        tensors[name] = TensorInfo(name, dtype, shape, nbytes, role, producers.get(name),
                                   tuple(consumers.get(name, ())))
    for name in graph_outputs:
        if name not in tensors:
            raise ModelLoadError(f"{source.label}: graph output {name!r} is produced by no node")
    graph = Graph(nodes, tensors, graph_inputs, graph_outputs, constants=small_constants(proto, nodes),
                  opset=source.opset)
    cycle = graph.find_cycle()
    if cycle is not None:
        raise ModelLoadError(f"{source.label}: nodes {' -> '.join(repr(n) for n in (*cycle, cycle[0]))} form a "
                             "cycle; an ONNX graph must be acyclic")
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
