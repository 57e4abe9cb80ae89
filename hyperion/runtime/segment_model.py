"""One segment of a schedule as a standalone ONNX model for onnxruntime.

The segment's nodes are copied from the user's model in schedule order; its
inputs are what it reads from earlier segments, its outputs what later segments
or the caller read. Its weights stay initializers, so onnxruntime treats them
as constants exactly as it does for the whole model (same pre-packed kernels,
same results). External-data weights are copied as references, so the session
reads them from the data file itself when it is created, and releases them
when it is dropped. The exception are the segment's ``fed_weights``: they are
graph inputs, so the session holds none of them and is built once; the runtime
feeds their mapped bytes on every run.

Everything else comes from the schedule as recorded: the small constants the
segment recomputes (``Segment.inlined_constants``) and the type it declares for
every boundary tensor (``TensorRecord.value_type``) -- no shape inference here.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
from onnx import ModelProto, NodeProto, TensorProto, TypeProto

from hyperion.frontend.build import unique_node_names
from hyperion.frontend.source import ModelSource
from hyperion.schedule import Schedule, Segment, ValueType

MIN_IR_VERSION = 4  # initializers need not be graph inputs from IR v4 on


def nodes_by_name(source: ModelSource) -> dict[str, NodeProto]:
    return dict(zip(unique_node_names(source.proto.graph.node), source.proto.graph.node, strict=True))


def build_segment_model(source: ModelSource, schedule: Schedule, segment: Segment, nodes: Mapping[str, NodeProto],
                        initializers: Mapping[str, TensorProto]) -> ModelProto:
    graph = onnx.GraphProto(name=f"segment_{segment.index}")
    graph.node.extend(nodes[schedule.tensors[name].producer] for name in segment.inlined_constants)
    graph.node.extend(_requested_outputs_only(nodes[schedule.steps[i].node], schedule) for i in segment.steps)
    graph.input.extend(_value_info(name, schedule) for name in segment.model_inputs)
    # Fed weights are inputs: the session holds no copy, and each run hands it the mapped bytes.
    graph.input.extend(onnx.helper.make_tensor_value_info(w, initializers[w].data_type, list(initializers[w].dims))
                       for w in segment.fed_weights)
    graph.output.extend(_value_info(name, schedule) for name in segment.outputs)
    fed = set(segment.fed_weights)
    graph.initializer.extend(initializers[w] for w in segment.weights if w not in fed)
    model = ModelProto(ir_version=max(source.proto.ir_version, MIN_IR_VERSION), graph=graph)
    model.opset_import.extend(source.proto.opset_import)
    model.functions.extend(source.proto.functions)
    return model


def _requested_outputs_only(node: NodeProto, schedule: Schedule) -> NodeProto:
    """``node`` with the optional outputs import left out of the IR blanked ("")."""
    if all(not name or name in schedule.tensors for name in node.output):
        return node
    trimmed = NodeProto()
    trimmed.CopyFrom(node)
    for index, name in enumerate(node.output):
        if name and name not in schedule.tensors:
            trimmed.output[index] = ""
    while trimmed.output and not trimmed.output[-1]:
        trimmed.output.pop()  # trailing optional outputs are simply omitted
    return trimmed


def _value_info(name: str, schedule: Schedule) -> onnx.ValueInfoProto:
    """The boundary tensor ``name`` as the schedule records its type; untyped when it
    records none (onnxruntime then infers it from the producing node)."""
    info = onnx.ValueInfoProto(name=name)
    record = schedule.tensors[name].value_type
    if record is not None:
        info.type.CopyFrom(type_proto(record))
    return info


def type_proto(record: ValueType) -> TypeProto:
    """The ONNX type a :class:`~hyperion.schedule.ValueType` records."""
    proto = TypeProto()
    if record.kind in ("tensor", "sparse_tensor"):
        tensor = getattr(proto, f"{record.kind}_type")
        tensor.SetInParent()
        tensor.elem_type = TensorProto.DataType.Value(record.elem_type or "UNDEFINED")
        if record.shape is not None:
            tensor.shape.SetInParent()
            for dim in record.shape:
                _set_dim(tensor.shape.dim.add(), dim)
    elif record.kind in ("sequence", "optional"):
        container = getattr(proto, f"{record.kind}_type")
        container.SetInParent()
        if record.element is not None:
            container.elem_type.CopyFrom(type_proto(record.element))
    elif record.kind == "map":
        proto.map_type.SetInParent()
        proto.map_type.key_type = TensorProto.DataType.Value(record.elem_type or "UNDEFINED")
        if record.element is not None:
            proto.map_type.value_type.CopyFrom(type_proto(record.element))
    return proto


def _set_dim(dim: onnx.TensorShapeProto.Dimension, value: int | str | None) -> None:
    if isinstance(value, int):
        dim.dim_value = value
    elif isinstance(value, str):
        dim.dim_param = value
