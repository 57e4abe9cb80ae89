"""Shapes of every tensor: onnx's shape inference on a weightless skeleton.

Shapes come from ``onnx.shape_inference`` with data propagation, then from
onnxruntime's symbolic shape inference (:mod:`hyperion.frontend.symbolic`)
where onnx's leaves a tensor unsized (contrib ops, symbolic arithmetic).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import onnx
from onnx import ModelProto, TensorProto, TypeProto

from hyperion.errors import OptionError
from hyperion.frontend.source import ModelSource
from hyperion.frontend.symbolic import infer_symbolic
from hyperion.frontend.types import declared_dims, type_facts
from hyperion.ir import SMALL_TENSOR_BYTES

log = logging.getLogger(__name__)


def skeleton_of(proto: ModelProto) -> ModelProto:
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
        small = tensor.data_location != TensorProto.EXTERNAL and tensor.ByteSize() <= SMALL_TENSOR_BYTES
        if small:
            graph.initializer.append(tensor)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    graph.sparse_initializer.extend(src.sparse_initializer)
    if skeleton.ir_version < 4:
        skeleton.ir_version = 4  # initializers need not be inputs from IR v4 on
    return skeleton


def bind_inputs(skeleton: ModelProto, weights: set[str],
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
                                  f"{type_facts(value_info.type)[0]}), so it has no shape to bind")
            tensor_type = value_info.type.tensor_type
            shape = [int(d) for d in input_shapes[name]]
            declared = declared_dims(value_info.type)
            if declared is not None and len(declared) != len(shape):
                raise OptionError(f"input_shapes: input {name!r} has rank {len(declared)}, got shape {shape}")
            for i, (want, have) in enumerate(zip(shape, declared or shape, strict=True)):
                if isinstance(have, int) and have != want:
                    raise OptionError(f"input_shapes: dim {i} of input {name!r} is fixed at {have}, got {want}")
            tensor_type.shape.ClearField("dim")
            for d in shape:
                tensor_type.shape.dim.add().dim_value = d
        bound[name] = declared_dims(value_info.type) or ()
    return bound


def declared_input_shapes(source: ModelSource) -> dict[str, tuple[int | str, ...] | None]:
    """Input shapes as the model file declares them (symbolic dims as names)."""
    weights = {t.name for t in source.proto.graph.initializer}
    return {i.name: declared_dims(i.type) for i in source.proto.graph.input if i.name not in weights}


def infer_types(skeleton: ModelProto, label: str, isolate_symbolic: bool,
                estimate: bool = True) -> tuple[ModelProto, ModelProto | None]:
    """(onnx's inference, onnxruntime's symbolic inference where onnx's left tensors unsized).

    onnx's result follows the operator specs; onnxruntime's symbolic inference
    sizes more (contrib ops, value-dependent shapes) but can be wrong, e.g. for
    Split lengths computed at run time, so it is only ever an estimate.
    ``isolate_symbolic`` runs the latter in a child process (see
    :mod:`hyperion.frontend.symbolic`).
    """
    try:
        inferred = _onnx_inference(skeleton)
    except Exception as exc:  # onnx raises several unrelated types here
        log.info("%s: onnx shape inference failed (%s); trying onnxruntime's", label, exc)
        inferred = skeleton
    if not estimate or _all_sized(inferred):  # estimate=False: onnx's inference alone
        return inferred, None
    return inferred, infer_symbolic(inferred, label, isolated=isolate_symbolic)


# onnx's data propagation turns an integer vector of known length that an op such as Cast,
# Add or Mul reads into a shape of that many dims, values unknown, about 140 bytes a dim
# (onnx 1.23: a Cast of an int64[10**7] took 2.2 s and 1.4 GB; the Range of a re-planned
# rest whose limit was observed as 10**8, 14 GB). No shape is that long, so where plain
# inference finds such a vector, its result is kept: a hostile model -- or a re-planned
# rest -- cannot exhaust memory at import, before any cap is checked. onnxruntime's
# symbolic inference then sizes what data propagation would have.
PROPAGATED_VECTOR_MAX_ELEMENTS = 1 << 16
_INTEGER_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
                            TensorProto.UINT64, TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8})


def _onnx_inference(skeleton: ModelProto) -> ModelProto:
    """onnx's shape inference, with data propagation unless a long integer vector makes it
    unsafe (see ``PROPAGATED_VECTOR_MAX_ELEMENTS``)."""
    plain = onnx.shape_inference.infer_shapes(skeleton)
    if _has_long_integer_vector(plain):
        log.info("onnx data propagation skipped: an integer vector longer than %d elements",
                 PROPAGATED_VECTOR_MAX_ELEMENTS)
        return plain
    return onnx.shape_inference.infer_shapes(skeleton, data_prop=True)


def _has_long_integer_vector(model: ModelProto) -> bool:
    graph = model.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if tensor.elem_type in _INTEGER_TYPES and tensor.HasField("shape") and len(tensor.shape.dim) == 1:
            dim = tensor.shape.dim[0]
            if dim.HasField("dim_value") and dim.dim_value > PROPAGATED_VECTOR_MAX_ELEMENTS:
                return True
    return False


def split_value_types(certain: ModelProto, estimated: ModelProto | None,
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
        if type_facts(sizing.get(value.name))[2] is None and type_facts(value.type)[2] is not None:
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
            if out and (out not in known or type_facts(known[out])[2] is None):
                return False
    return True


