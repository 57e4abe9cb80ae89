"""``hyperion.InferenceSession``: onnxruntime's ``InferenceSession`` surface over a compiled model.

Code written against onnxruntime switches by changing one call::

    sess = ort.InferenceSession(path, sess_options, providers=["CPUExecutionProvider"])
    sess = hyperion.InferenceSession(path, sess_options, providers=["CPUExecutionProvider"],
                                     memory_limit="256MB")

``run(output_names, input_feed)`` returns a list in the order asked (``None`` or an
empty list: every output) and plans and runs only the part of the graph those
outputs need (:meth:`hyperion.CompiledModel.run`'s ``outputs=``). ``get_inputs()``
/ ``get_outputs()`` / ``get_overridable_initializers()`` return :class:`NodeArg`
objects with onnxruntime's ``name``, ``shape`` and ``type``; ``get_modelmeta()``
a :class:`ModelMetadata` with onnxruntime's fields.

Errors a user of onnxruntime catches are raised as classes that derive from both
Hyperion's error and onnxruntime's exception (see :data:`ERROR_MAPPING`): a bad
feed is a :class:`hyperion.FeedError` *and* an
``onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument`` (and a
``ValueError``, which onnxruntime raises for missing inputs).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, TypeProto
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from hyperion.api import CompiledModel, compile
from hyperion.errors import (
    FeedError,
    HyperionError,
    ModelLoadError,
    OptionError,
    RuntimeExecutionError,
    UnsupportedModelError,
)
from hyperion.frontend.shapes import skeleton_of

CPU_PROVIDER = "CPUExecutionProvider"
NO_VERSION = 2**63 - 1  # onnxruntime's ModelMetadata.version when the model sets none


# -- onnxruntime's exceptions, as Hyperion errors -------------------------------------------
class InvalidArgument(FeedError, _ort_errors.InvalidArgument):
    """A bad feed or output name: Hyperion's FeedError, onnxruntime's InvalidArgument, a ValueError."""


class RuntimeException(RuntimeExecutionError, _ort_errors.RuntimeException):
    """onnxruntime failed while running a segment."""


class NoSuchFile(ModelLoadError, _ort_errors.NoSuchFile):
    """The model file does not exist."""


class InvalidProtobuf(ModelLoadError, _ort_errors.InvalidProtobuf):
    """The model is not an ONNX protobuf."""


class Fail(UnsupportedModelError, _ort_errors.Fail):
    """Hyperion or onnxruntime cannot run the model."""


class ModelLoadFail(ModelLoadError, _ort_errors.Fail):
    """The model's external data is missing, truncated or outside its folder."""


#: Hyperion's error -> the class raised by :class:`InferenceSession`, which is both.
#: Other Hyperion errors (MemoryLimitError, ShapeError, OptionError) have no
#: onnxruntime counterpart and are raised as they are.
ERROR_MAPPING: dict[type[HyperionError], type[HyperionError]] = {
    FeedError: InvalidArgument,
    RuntimeExecutionError: RuntimeException,
    UnsupportedModelError: Fail,
    ModelLoadError: ModelLoadFail,  # InvalidProtobuf / NoSuchFile where those apply
}


def as_onnxruntime_error(error: HyperionError) -> HyperionError:
    """``error`` as the class that is both Hyperion's and onnxruntime's; itself if none applies."""
    if isinstance(error, _ort_errors.Fail | _ort_errors.InvalidArgument | _ort_errors.RuntimeException
                  | _ort_errors.NoSuchFile | _ort_errors.InvalidProtobuf):
        return error
    target = next((mapped for base, mapped in ERROR_MAPPING.items() if isinstance(error, base)), None)
    if target is ModelLoadFail and "not an ONNX model" in str(error):
        target = InvalidProtobuf
    if target is None:
        return error
    mapped = target(*error.args)
    mapped.__dict__.update(error.__dict__)
    return mapped


# -- onnxruntime's value types ------------------------------------------------------------
@dataclass(frozen=True)
class NodeArg:
    """A graph input or output as onnxruntime's ``NodeArg`` describes it.

    ``shape`` holds an int per fixed dim, the name of a symbolic dim, or None for
    a dim without either; ``type`` is onnxruntime's type string ("tensor(float)",
    "seq(tensor(int64))", "map(string,tensor(float))", "optional(tensor(float))").
    """

    name: str
    type: str
    shape: list[int | str | None]

    def __str__(self) -> str:
        return f"NodeArg(name={self.name!r}, type={self.type!r}, shape={self.shape!r})"


@dataclass(frozen=True)
class ModelMetadata:
    """onnxruntime's ``ModelMetadata``: the model's own description fields."""

    producer_name: str
    graph_name: str
    domain: str
    description: str
    graph_description: str
    version: int
    custom_metadata_map: dict[str, str] = field(default_factory=dict)


def type_string(type_proto: TypeProto) -> str:
    """onnxruntime's name of a type: ``tensor(float)``, ``seq(tensor(int64))``, ..."""
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({_element_name(type_proto.tensor_type.elem_type)})"
    if kind == "sparse_tensor_type":
        return f"sparse_tensor({_element_name(type_proto.sparse_tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"seq({type_string(type_proto.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({type_string(type_proto.optional_type.elem_type)})"
    if kind == "map_type":
        key = _element_name(type_proto.map_type.key_type)
        return f"map({key},{type_string(type_proto.map_type.value_type)})"
    return "unknown"


def _element_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def shape_of(type_proto: TypeProto) -> list[int | str | None]:
    """onnxruntime's ``NodeArg.shape``: [] for a tensor of unknown rank or a non-tensor."""
    kind = type_proto.WhichOneof("value")
    if kind not in ("tensor_type", "sparse_tensor_type"):
        return []
    tensor = getattr(type_proto, kind)
    if not tensor.HasField("shape"):
        return []
    return [int(d.dim_value) if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
            for d in tensor.shape.dim]


def _without_made_up_dims(type_proto: TypeProto, declared: set[str]) -> TypeProto:
    """``type_proto`` without the dim names onnx's inference makes up (``unk__0``): onnxruntime
    reports such a dim as None."""
    if not type_proto.HasField("tensor_type"):
        return type_proto
    cleaned = TypeProto()
    cleaned.CopyFrom(type_proto)
    for dim in cleaned.tensor_type.shape.dim:
        if dim.HasField("dim_param") and dim.dim_param.startswith("unk__") and dim.dim_param not in declared:
            dim.ClearField("dim_param")
    return cleaned


def _has_shape(type_proto: TypeProto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        return getattr(type_proto, kind).HasField("shape")
    return kind is not None


def _provider_name(provider: str | tuple[str, Mapping[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _check_providers(providers: Sequence[str | tuple[str, Mapping[str, Any]]] | None) -> None:
    """Hyperion runs on onnxruntime's CPU provider: other providers are skipped with a
    warning (as onnxruntime skips unavailable ones) if the list has the CPU provider,
    refused otherwise."""
    if not providers:
        return
    names = [_provider_name(p) for p in providers]
    others = [name for name in names if name != CPU_PROVIDER]
    if CPU_PROVIDER not in names:
        raise OptionError(f"providers: Hyperion runs on {CPU_PROVIDER} only, got {names}; "
                          f"add {CPU_PROVIDER!r} to the list (or pass providers=None)")
    if others:
        warnings.warn(f"providers: Hyperion runs on {CPU_PROVIDER} only; ignoring {others}", UserWarning,
                      stacklevel=3)


# -- the session ------------------------------------------------------------------------------
class InferenceSession:
    """onnxruntime's ``InferenceSession``, planned and run by Hyperion under ``memory_limit``.

    ``path_or_bytes``: a path, the model's bytes, or an ``onnx.ModelProto``.
    ``sess_options``: an ``onnxruntime.SessionOptions``; its ``intra_op_num_threads``
    sizes every session Hyperion creates (its other fields do not apply: Hyperion
    builds its sessions with its own recipe). ``providers``: None, or a list that
    contains ``"CPUExecutionProvider"``. ``memory_limit`` and ``mode`` are
    :func:`hyperion.compile`'s; further keyword arguments (``input_shapes``,
    ``weight_cache``, ``prepack_weights``, ...) are passed on to it.
    """

    def __init__(self, path_or_bytes: str | os.PathLike | bytes | onnx.ModelProto,
                 sess_options: ort.SessionOptions | None = None,
                 providers: Sequence[str | tuple[str, Mapping[str, Any]]] | None = None,
                 provider_options: Sequence[Mapping[str, Any]] | None = None, *,
                 memory_limit: int | str | None = None, mode: str = "adaptive",
                 **compile_options: Any) -> None:
        _check_providers(providers)
        self._sess_options = sess_options if sess_options is not None else ort.SessionOptions()
        if isinstance(path_or_bytes, str | os.PathLike) and not Path(path_or_bytes).is_file():
            raise NoSuchFile(f"{path_or_bytes}: no such model file")
        threads = int(getattr(self._sess_options, "intra_op_num_threads", 0) or 0)
        try:
            self._model = compile(path_or_bytes, memory_limit=memory_limit, mode=mode,
                                  intra_op_num_threads=threads, **compile_options)
        except HyperionError as exc:
            raise as_onnxruntime_error(exc).with_traceback(exc.__traceback__) from None
        self._proto = self._model._source.proto
        self._inferred_types: dict[str, TypeProto] | None = None
        weights = {t.name for t in self._proto.graph.initializer}
        self._inputs = [self._node_arg(v.name, v.type) for v in self._proto.graph.input if v.name not in weights]
        self._overridable = [self._node_arg(v.name, v.type) for v in self._proto.graph.input if v.name in weights]
        self._outputs = [self._node_arg(v.name, v.type if _has_shape(v.type) else self._inferred(v.name))
                         for v in self._proto.graph.output]

    @staticmethod
    def _node_arg(name: str, type_proto: TypeProto) -> NodeArg:
        return NodeArg(name, type_string(type_proto), shape_of(type_proto))

    def _inferred(self, name: str) -> TypeProto:
        """An output's type from onnx's shape inference (unbound dims as the model declares
        them), for outputs the model declares without a shape, as onnxruntime reports them."""
        if self._inferred_types is None:
            try:
                inferred = onnx.shape_inference.infer_shapes(skeleton_of(self._proto))
                self._inferred_types = {v.name: _without_made_up_dims(v.type, self._declared_dim_names())
                                        for v in inferred.graph.output}
            except Exception:  # onnx raises several unrelated types; the declaration stays
                self._inferred_types = {}
        assert self._inferred_types is not None
        declared = next(v.type for v in self._proto.graph.output if v.name == name)
        return self._inferred_types.get(name, declared)

    def _declared_dim_names(self) -> set[str]:
        graph = self._proto.graph
        return {d.dim_param for v in (*graph.input, *graph.output, *graph.value_info)
                if v.type.HasField("tensor_type") for d in v.type.tensor_type.shape.dim if d.dim_param}

    # -- onnxruntime's surface ----------------------------------------------------------------
    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_overridable_initializers(self) -> list[NodeArg]:
        """Initializers the model also lists as inputs (old exporters). Hyperion reports them
        as onnxruntime does but does not let a feed override them (run raises InvalidArgument)."""
        return list(self._overridable)

    def get_modelmeta(self) -> ModelMetadata:
        proto = self._proto
        return ModelMetadata(
            producer_name=proto.producer_name, graph_name=proto.graph.name, domain=proto.domain,
            description=proto.doc_string, graph_description=proto.graph.doc_string,
            version=proto.model_version if proto.HasField("model_version") else NO_VERSION,
            custom_metadata_map={p.key: p.value for p in proto.metadata_props})

    def get_providers(self) -> list[str]:
        return [CPU_PROVIDER]

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {CPU_PROVIDER: {}}

    def get_session_options(self) -> ort.SessionOptions:
        return self._sess_options

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        """The outputs ``output_names`` (None or empty: all), in that order; only the part of
        the graph they need runs. ``run_options`` is accepted and not used."""
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        try:
            self._check_feed_names(input_feed)
            results = self._model.run(input_feed, outputs=names)
        except HyperionError as exc:
            raise as_onnxruntime_error(exc).with_traceback(exc.__traceback__) from None
        return [results[name] for name in names]

    def run_with_ort_values(self, output_names: Sequence[str] | None, input_dict_ort_values: Mapping[str, Any],
                            run_options: ort.RunOptions | None = None) -> list[ort.OrtValue]:
        """:meth:`run` over ``OrtValue`` inputs and outputs (CPU tensors)."""
        feeds = {name: value.numpy() if isinstance(value, ort.OrtValue) else value
                 for name, value in input_dict_ort_values.items()}
        return [ort.OrtValue.ortvalue_from_numpy(value) for value in self.run(output_names, feeds, run_options)]

    def _check_feed_names(self, input_feed: Mapping[str, Any]) -> None:
        if not isinstance(input_feed, Mapping):
            raise FeedError(f"input_feed: expected a dict of input name -> array, got {type(input_feed).__name__}")
        missing = [i.name for i in self._inputs if i.name not in input_feed]
        if missing:  # onnxruntime's wording
            raise FeedError(f"Required inputs ({missing}) are missing from input feed ({list(input_feed)}).")
        overridden = [o.name for o in self._overridable if o.name in input_feed]
        if overridden:
            raise FeedError(f"input {overridden[0]!r} is an initializer; Hyperion does not let a feed "
                            "override initializers")
        known = {i.name for i in self._inputs}
        unknown = [name for name in input_feed if name not in known]
        if unknown:
            raise FeedError(f"Invalid input name: {unknown[0]}; inputs are {sorted(known)}")

    # -- Hyperion's additions --------------------------------------------------------------
    @property
    def compiled_model(self) -> CompiledModel:
        """The :class:`hyperion.CompiledModel` behind the session."""
        return self._model

    @property
    def schedule(self) -> Any:
        """The plan of the last run (its input shapes and outputs)."""
        return self._model.schedule

    def close(self) -> None:
        """Release every onnxruntime session (and the weights they hold)."""
        self._model.close()

    def __repr__(self) -> str:
        return repr(self._model).replace("<CompiledModel", "<hyperion.InferenceSession", 1)

    def _repr_html_(self) -> str:
        return self._model._repr_html_()


__all__ = ["ERROR_MAPPING", "Fail", "InferenceSession", "InvalidArgument", "InvalidProtobuf", "ModelLoadFail",
           "ModelMetadata", "NoSuchFile", "NodeArg", "RuntimeException", "as_onnxruntime_error", "type_string"]
