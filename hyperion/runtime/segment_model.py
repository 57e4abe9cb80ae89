"""One segment of a schedule as a standalone ONNX model for onnxruntime.

The segment's nodes are copied from the user's model in schedule order; its
inputs are what it reads from earlier segments, its outputs what later segments
or the caller read. Its weights stay initializers, so onnxruntime treats them
as constants exactly as it does for the whole model (same pre-packed kernels,
same results). External-data weights are copied as references, so the session
reads them from the data file itself when it is created, and releases them
when it is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, TypeProto

from hyperion.frontend.build import unique_node_names
from hyperion.frontend.source import ModelSource
from hyperion.schedule import Schedule, Segment

MIN_IR_VERSION = 4  # initializers need not be graph inputs from IR v4 on
# Constants up to this size are recomputed inside every segment that reads them
# (shape-like values); larger ones are fed like any activation, held once.
MAX_INLINED_CONSTANT_BYTES = 4096


def nodes_by_name(source: ModelSource) -> dict[str, NodeProto]:
    return dict(zip(unique_node_names(source.proto.graph.node), source.proto.graph.node))


def build_segment_model(source: ModelSource, schedule: Schedule, segment: Segment,
                        value_types: Mapping[str, TypeProto], nodes: Mapping[str, NodeProto],
                        initializers: Mapping[str, TensorProto]) -> ModelProto:
    graph = onnx.GraphProto(name=f"segment_{segment.index}")
    constants = inlined_constants(schedule, segment, nodes)
    graph.node.extend(nodes[schedule.tensors[name].producer] for name in constants)
    graph.node.extend(_requested_outputs_only(nodes[schedule.steps[i].node], schedule) for i in segment.steps)
    graph.input.extend(_value_info(name, schedule, value_types) for name in segment.inputs if name not in constants)
    graph.output.extend(_value_info(name, schedule, value_types) for name in segment.outputs)
    graph.initializer.extend(initializers[w] for w in segment.weights)
    model = ModelProto(ir_version=max(source.proto.ir_version, MIN_IR_VERSION), graph=graph)
    model.opset_import.extend(source.proto.opset_import)
    model.functions.extend(source.proto.functions)
    return model


def inlined_constants(schedule: Schedule, segment: Segment, nodes: Mapping[str, NodeProto]) -> tuple[str, ...]:
    """Inputs of ``segment`` that small ``Constant`` nodes produce: its model recomputes them.

    onnxruntime folds a Constant into the graph, so ops whose output shape
    depends on an input's value (Reshape, Unsqueeze, Range, ...) get static
    shapes -- which Scan and Loop bodies reading them from the outer scope need.
    Fed as a graph input instead, the value is unknown when the session is built.
    """
    inlined = []
    for name in segment.inputs:
        record = schedule.tensors.get(name)
        producer = None if record is None else record.producer
        node = nodes.get(producer) if producer is not None else None
        if (node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")
                and record.bytes is not None and record.bytes <= MAX_INLINED_CONSTANT_BYTES):
            inlined.append(name)
    return tuple(inlined)


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


def segment_model_inputs(schedule: Schedule, segment: Segment, nodes: Mapping[str, NodeProto]) -> tuple[str, ...]:
    """The inputs the segment's model takes: ``segment.inputs`` less the inlined constants."""
    constants = set(inlined_constants(schedule, segment, nodes))
    return tuple(name for name in segment.inputs if name not in constants)


def _value_info(name: str, schedule: Schedule, value_types: Mapping[str, TypeProto]) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto(name=name)
    if name in value_types and value_types[name].WhichOneof("value"):
        info.type.CopyFrom(value_types[name])
        return info
    record = schedule.tensors[name]
    try:
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(record.dtype))
    except TypeError:
        return info  # unknown type: onnxruntime infers it from the producing node
    shape = None if record.shape is None else [d if isinstance(d, int) else None for d in record.shape]
    return onnx.helper.make_tensor_value_info(name, elem_type, shape)


def with_free_batch(value_types: Mapping[str, TypeProto], dim_name: str = "hyperion_batch") -> dict[str, TypeProto]:
    """``value_types`` with axis 0 of every tensor type made symbolic, for chunks of a batch."""
    relaxed: dict[str, TypeProto] = {}
    for name, type_proto in value_types.items():
        if type_proto.WhichOneof("value") == "tensor_type" and type_proto.tensor_type.shape.dim:
            type_proto = TypeProto.FromString(type_proto.SerializeToString())
            dim = type_proto.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = dim_name
        relaxed[name] = type_proto
    return relaxed
