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

from hyperion.onnx_import import ModelSource, _unique_names
from hyperion.schedule import Schedule, Segment

MIN_IR_VERSION = 4  # initializers need not be graph inputs from IR v4 on


def nodes_by_name(source: ModelSource) -> dict[str, NodeProto]:
    return dict(zip(_unique_names(source.proto.graph.node), source.proto.graph.node))


def build_segment_model(source: ModelSource, schedule: Schedule, segment: Segment,
                        value_types: Mapping[str, TypeProto], nodes: Mapping[str, NodeProto],
                        initializers: Mapping[str, TensorProto]) -> ModelProto:
    graph = onnx.GraphProto(name=f"segment_{segment.index}")
    graph.node.extend(nodes[schedule.steps[i].node] for i in segment.steps)
    graph.input.extend(_value_info(name, schedule, value_types) for name in segment.inputs)
    graph.output.extend(_value_info(name, schedule, value_types) for name in segment.outputs)
    graph.initializer.extend(initializers[w] for w in segment.weights)
    model = ModelProto(ir_version=max(source.proto.ir_version, MIN_IR_VERSION), graph=graph)
    model.opset_import.extend(source.proto.opset_import)
    model.functions.extend(source.proto.functions)
    return model


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
