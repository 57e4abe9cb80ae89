"""An ONNX backend (``onnx.backend.base.Backend``) that runs models through Hyperion.

Models are compiled with :func:`hyperion.compile` and executed by Hyperion's
runtime, segment by segment, on onnxruntime's CPU kernels. The options a
backend compiles with are fixed per backend class, because the ONNX backend
test runner calls ``prepare(model, device)`` with nothing else::

    import hyperion.backend as hb

    outputs = hb.run_model(model, [x])                       # module-level, like onnxruntime.backend
    per_node = hb.HyperionBackend.with_options(max_segment_steps=1, whole_model_shortcut=False)
    rep = per_node.prepare(model, "CPU")                     # one onnxruntime session per node
    outputs = rep.run([x])

``max_segment_steps=1`` with ``whole_model_shortcut=False`` sends every node of
every model, single-node models included, through segment extraction; that is
the setting the conformance suite holds Hyperion to.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TypeProto, ValueInfoProto
from onnx.backend.base import Backend, BackendRep, Device, DeviceType

from hyperion.api import CompiledModel, compile
from hyperion.errors import FeedError, OptionError
from hyperion.ir import DEFAULT_DOMAIN, ExecutionMode, normalise_domain

ModelInput = ModelProto | bytes | str | os.PathLike


@dataclass(frozen=True)
class BackendOptions:
    """What :func:`hyperion.compile` is called with; see its docstring."""

    memory_limit: int | str | None = None
    mode: str | ExecutionMode = "adaptive"
    max_segment_steps: int | None = None
    whole_model_shortcut: bool = True
    check_model: bool = True  # run onnx.checker first, as every ONNX backend does

    def replace(self, overrides: Mapping[str, Any]) -> BackendOptions:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise OptionError(f"hyperion.backend: unknown option {unknown[0]!r}; options are {sorted(known)}")
        return dataclasses.replace(self, **overrides)


class HyperionRep(BackendRep):
    """A compiled model; ``run`` takes inputs in graph order (list), by name (dict),
    or a single array for a one-input model, and returns outputs in graph order."""

    def __init__(self, compiled: CompiledModel, output_names: Sequence[str]) -> None:
        self.compiled = compiled
        self.output_names = tuple(output_names)

    def run(self, inputs: Any, **kwargs: Any) -> list[Any]:
        outputs = self.compiled.run(self._feeds(inputs))
        return [outputs[name] for name in self.output_names]

    def _feeds(self, inputs: Any) -> dict[str, Any]:
        names = self.compiled.input_names
        if isinstance(inputs, Mapping):
            return {name: _as_value(value) for name, value in inputs.items()}
        if isinstance(inputs, list | tuple):
            if len(inputs) < len(names):
                raise FeedError(f"hyperion.backend: the model has {len(names)} inputs {list(names)}, "
                                f"got {len(inputs)} values")
            return {name: _as_value(value) for name, value in zip(names, inputs, strict=True)}
        if len(names) != 1:
            raise FeedError(f"hyperion.backend: the model has {len(names)} inputs {list(names)}; "
                            "pass a list or a dict, not a single value")
        return {names[0]: _as_value(inputs)}


def _as_value(value: Any) -> Any:
    # onnxruntime takes arrays, lists (sequences) and None (empty optionals), not numpy scalars.
    return np.asarray(value) if isinstance(value, np.generic) else value


class HyperionBackend(Backend):
    """The ONNX backend API over Hyperion, compiling with the class's ``options``."""

    options: ClassVar[BackendOptions] = BackendOptions()

    @classmethod
    def with_options(cls, **options: Any) -> type[HyperionBackend]:
        """A backend class whose ``prepare`` compiles with these options by default."""
        configured = cls.options.replace(options)
        suffix = "_".join(f"{k}_{v}" for k, v in sorted(options.items()))
        return type(f"{cls.__name__}_{suffix}", (cls,), {"options": configured})

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return Device(device).type == DeviceType.CPU

    @classmethod
    def is_compatible(cls, model: ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model: ModelInput, device: str = "CPU", **kwargs: Any) -> HyperionRep:
        """Compile ``model``; ``kwargs`` override the class's :class:`BackendOptions`."""
        if not cls.supports_device(device):
            raise OptionError(f"hyperion.backend: device {device!r} is not supported; Hyperion runs on CPU")
        options = cls.options.replace(kwargs)
        proto = model if isinstance(model, ModelProto) else None
        if options.check_model:
            onnx.checker.check_model(proto if proto is not None else _as_checkable(model))
        compiled = compile(model, memory_limit=options.memory_limit, mode=options.mode,
                           max_segment_steps=options.max_segment_steps,
                           whole_model_shortcut=options.whole_model_shortcut)
        if proto is None:
            proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else \
                onnx.load(os.fspath(model), load_external_data=False)
        return HyperionRep(compiled, [o.name for o in proto.graph.output])

    @classmethod
    def run_model(cls, model: ModelInput, inputs: Any, device: str = "CPU", **kwargs: Any) -> list[Any]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None,
                 **kwargs: Any) -> list[Any]:
        """Run one node: it becomes a one-node model whose inputs are typed by ``inputs``."""
        opset = kwargs.pop("opset_version", None)
        model = node_model(node, inputs, outputs_info, opset)
        return cls.run_model(model, _positional(node, inputs), device, **kwargs)


def node_model(node: NodeProto, inputs: Any, outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None,
               opset: int | None = None) -> ModelProto:
    """A model holding only ``node``, its present inputs typed from the values given."""
    names = [name for name in node.input if name]
    values = _positional(node, inputs)
    graph_inputs = [_value_info(name, value) for name, value in zip(names, values, strict=True)]
    outputs = [name for name in node.output if name]
    infos = list(outputs_info or [])
    # Outputs the caller did not describe are left untyped here; onnx's inference types them.
    graph_outputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt)),
                                                        list(shape))
                     if i < len(infos) else ValueInfoProto(name=name)
                     for i, (name, (dt, shape)) in enumerate(zip(outputs, infos + [(None, ())] * len(outputs),
                                                                 strict=False))]
    graph = onnx.helper.make_graph([node], f"{node.op_type}_node", graph_inputs, graph_outputs)
    imports = [onnx.helper.make_opsetid("", opset or onnx.defs.onnx_opset_version())]
    if normalise_domain(node.domain) != DEFAULT_DOMAIN:
        imports.append(onnx.helper.make_opsetid(node.domain, 1))
    model = onnx.helper.make_model(graph, opset_imports=imports)
    if len(infos) < len(outputs):  # outputs the caller did not type: as onnx's shape inference types them
        model = onnx.shape_inference.infer_shapes(model)
    return model


def _positional(node: NodeProto, inputs: Any) -> list[Any]:
    names = [name for name in node.input if name]
    if isinstance(inputs, Mapping):
        return [inputs[name] for name in names]
    return list(inputs) if isinstance(inputs, list | tuple) else [inputs]


def _value_info(name: str, value: Any) -> ValueInfoProto:
    info = ValueInfoProto(name=name)
    info.type.CopyFrom(_type_of(value))
    return info


def _type_of(value: Any) -> TypeProto:
    if isinstance(value, list):
        element = _type_of(value[0]) if value else onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)
        return onnx.helper.make_sequence_type_proto(element)
    array = np.asarray(value)
    return onnx.helper.make_tensor_type_proto(onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))


def _as_checkable(model: bytes | str | os.PathLike) -> bytes | str:
    return model if isinstance(model, bytes) else os.fspath(model)


prepare = HyperionBackend.prepare
run_model = HyperionBackend.run_model
run = HyperionBackend.run_model
run_node = HyperionBackend.run_node
supports_device = HyperionBackend.supports_device
is_compatible = HyperionBackend.is_compatible

__all__ = ["BackendOptions", "HyperionBackend", "HyperionRep", "is_compatible", "node_model", "prepare",
           "run", "run_model", "run_node", "supports_device"]
