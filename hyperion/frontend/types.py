"""ONNX type facts as Hyperion's IR states them: dtype names, dims, byte sizes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, TypeProto

from hyperion.ir import tensor_nbytes


def itemsize(elem_type: int) -> int | None:
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
        if elem_type not in TensorProto.DataType.values():
            return f"unknown_type_{elem_type}"   # an element type ONNX does not define
        return TensorProto.DataType.Name(elem_type).lower()


def declared_dims(type_proto: TypeProto) -> tuple[int | str, ...] | None:
    if type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for i, dim in enumerate(type_proto.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or f"?{i}")
    return tuple(dims)


def type_facts(type_proto: TypeProto | None) -> tuple[str, tuple[int | str, ...] | None, int | None]:
    if type_proto is None:
        return "unknown", None, None
    kind = type_proto.WhichOneof("value")
    if kind != "tensor_type":
        return kind.removesuffix("_type") if kind else "unknown", None, None
    elem = type_proto.tensor_type.elem_type
    shape = declared_dims(type_proto)
    return dtype_name(elem), shape, tensor_nbytes(itemsize(elem), shape)

