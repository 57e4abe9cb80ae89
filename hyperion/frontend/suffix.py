"""The rest of a model, imported once the data has decided its sizes.

A re-planned schedule (``Schedule.replan``) runs the prefix of the model; the
tensors it hands on are observed, and :func:`import_suffix` imports the remaining
nodes as a model of their own: those tensors become its inputs, typed with the
observed shapes (a sequence with its element type, sized by its observed bytes),
and the tensors observed by value become constants, so onnx's shape inference sizes
what they decide (a Range's length, a ConstantOfShape's shape); an If whose condition
is observed becomes the branch it takes. Nodes keep the names they have in the user's
model (an inlined branch's: ``if_name/branch/node``), so the schedule planned from it runs
on the same nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from hyperion.errors import UnsupportedModelError
from hyperion.frontend.bounds import unsized_tensors, upper_bounds
from hyperion.frontend.build import ImportedModel, import_model, outer_scope_reads, unique_node_names
from hyperion.frontend.source import ModelSource
from hyperion.ir import Graph, TensorRole


def observed_nbytes(value: Any) -> int:
    """Bytes of an observed value: an array, or a sequence of arrays (maps: their entries)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, list | tuple):
        return sum(observed_nbytes(v) for v in value)
    if isinstance(value, dict):
        return 16 * len(value)
    return 0


def import_suffix(source: ModelSource, suffix_nodes: tuple[str, ...], outputs: tuple[str, ...],
                  observed: Mapping[str, Any], by_value: frozenset[str], *,
                  isolate_symbolic: bool, declared: Mapping[str, onnx.TypeProto] | None = None,
                  constants: frozenset[str] = frozenset()) -> ImportedModel:
    """The nodes ``suffix_nodes`` of ``source`` as a model whose inputs are the ``observed``
    values they read (``by_value`` ones as constants); its outputs: those of ``outputs`` it makes.
    ``declared``: the types the prefix's plan declares for what it hands on; they (or the
    model's own declarations) type an observed value that cannot type itself (an empty sequence).
    ``constants``: the ``by_value`` ones the model itself makes constant (its Constant nodes)."""
    inferred = _suffix_model(source.proto, suffix_nodes, outputs, observed, by_value, declared or {})
    rest = dataclasses.replace(source, proto=inferred)
    # onnx's inference alone first (milliseconds); onnxruntime's estimate, in a child process
    # under a cap (a second or so), only where it leaves sizes that no bound covers.
    imported = _with_observed_bytes(import_model(rest, estimate=False), observed)
    unsized = unsized_tensors(imported)
    if set(unsized) - set(upper_bounds(imported, unsized)):
        imported = _with_observed_bytes(import_model(rest, isolate_symbolic=isolate_symbolic), observed)
    return _values_fed(imported, by_value - constants, observed, declared or {})


def _values_fed(imported: ImportedModel, by_value: frozenset[str], observed: Mapping[str, Any],
                declared: Mapping[str, onnx.TypeProto]) -> ImportedModel:
    """The values shape inference read as constants, made inputs again for running.

    As constants they size what they decide; as initializers of a segment model they would
    also be checked by onnxruntime's own inference, which is stricter than its kernels (a
    Range fed a one-element vector runs, but refuses it as a constant). So the plan runs
    the observed values as inputs, declared as the prefix's plan declared them (what onnx
    inferred in the whole model), else by their element type alone; their values stay known
    to the passes as constants. The model's own constants stay initializers. Both keep what
    onnxruntime's inference knew in the whole model: it runs a Scan only when that inference
    shaped every body output, which may depend on outer values (a Reshape to a constant
    shape, a Mul by an observed scalar).
    """
    graph, proto = imported.graph, imported.source.proto
    fed = [t for t in proto.graph.initializer if t.name in by_value and t.name in graph.tensors]
    if not fed:
        return imported
    names = {t.name for t in fed}
    running = ModelProto()
    running.CopyFrom(proto)
    kept = [t for t in running.graph.initializer if t.name not in names]
    del running.graph.initializer[:]
    running.graph.initializer.extend(kept)
    types = {t.name: _fed_type(t, declared.get(t.name)) for t in fed}
    running.graph.input.extend(helper.make_value_info(t.name, types[t.name]) for t in fed)
    tensors = {name: dataclasses.replace(info, role=TensorRole.INPUT, external=None) if name in names else info
               for name, info in graph.tensors.items()}
    inputs = (*graph.inputs, *(t.name for t in fed))
    regraphed = Graph(list(graph.nodes.values()), tensors, inputs, graph.outputs, constants=graph.constants,
                      opset=graph.opset)
    value_types = {**imported.value_types, **types}
    shapes = {**imported.input_shapes, **{t.name: tuple(np.shape(observed[t.name])) for t in fed}}
    return ImportedModel(dataclasses.replace(imported.source, proto=running), regraphed, value_types, shapes)


def _fed_type(value: onnx.TensorProto, declared: onnx.TypeProto | None) -> onnx.TypeProto:
    """The type of an observed value fed to the rest (see :func:`_values_fed`)."""
    if declared is not None and declared.WhichOneof("value") == "tensor_type" and \
            declared.tensor_type.elem_type == value.data_type:
        return declared
    return helper.make_tensor_type_proto(value.data_type, None)


def _with_observed_bytes(imported: ImportedModel, observed: Mapping[str, Any]) -> ImportedModel:
    graph = imported.graph
    unsized_inputs = {name: dataclasses.replace(graph.tensors[name], nbytes=observed_nbytes(observed[name]))
                      for name in graph.inputs if graph.tensors[name].nbytes is None and name in observed}
    if unsized_inputs:  # sequences: no shape, but their observed bytes are exact
        imported = dataclasses.replace(imported, graph=graph.with_tensors({**graph.tensors, **unsized_inputs}))
    return imported


def _suffix_model(proto: ModelProto, suffix_nodes: tuple[str, ...], outputs: tuple[str, ...],
                  observed: Mapping[str, Any], by_value: frozenset[str],
                  declared: Mapping[str, onnx.TypeProto]) -> ModelProto:
    named = dict(zip(unique_node_names(proto.graph.node), proto.graph.node, strict=True))
    wanted = set(suffix_nodes)
    model = ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(model, field, getattr(proto, field))
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    graph = model.graph
    graph.name = proto.graph.name
    produced: set[str] = set()
    reads: list[str] = []
    for name, node in named.items():
        if name not in wanted:
            continue
        copy = graph.node.add()
        copy.CopyFrom(node)
        copy.name = name  # the name the schedule knows it by
        reads.extend(t for t in [*node.input, *outer_scope_reads(node)] if t and t not in produced)
        produced.update(t for t in node.output if t)
    weights = {t.name: t for t in proto.graph.initializer}
    model_types = {v.name: v.type for v in (*proto.graph.input, *proto.graph.value_info)}
    for name in dict.fromkeys(reads):
        if name in produced:
            continue
        if name in weights:
            graph.initializer.append(weights[name])
        elif name in by_value:
            graph.initializer.append(numpy_helper.from_array(np.asarray(observed[name]), name))
        else:
            graph.input.append(_value_info(name, observed[name], declared.get(name, model_types.get(name))))
    known = {name: observed[name] for name in by_value if name in observed}
    _inline_decided_branches(graph, known)
    declared = {o.name: o for o in proto.graph.output}
    graph.output.extend(declared[name] if name in declared else helper.make_value_info(name, onnx.TypeProto())
                        for name in outputs if name in produced)
    return model


def _inline_decided_branches(graph: onnx.GraphProto, values: Mapping[str, Any]) -> None:
    """Replace every If whose condition was observed by the branch it takes.

    onnx's shape inference merges both branches of an If, whatever its condition: with
    branches of different shapes its outputs stay unsized even once the condition is
    known. The branch's nodes, in its place, are sized like any others. Each branch result
    its nodes make takes the If output's name; an Identity gives the name to the others (a
    result the branch passes through from outside, or one it returns twice).
    """
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        cond = node.input[0] if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input else None
        if cond not in values:
            graph.node.append(node)
            continue
        taken = "then_branch" if bool(np.asarray(values[cond]).reshape(-1)[0]) else "else_branch"
        branch = onnx.GraphProto()
        branch.CopyFrom(next(a.g for a in node.attribute if a.name == taken))
        passed_through = _name_results(branch, node.output)
        graph.initializer.extend(branch.initializer)
        for index, inner in enumerate(branch.node):
            copy = graph.node.add()
            copy.CopyFrom(inner)
            copy.name = f"{node.name}/{taken}/{inner.name or f'{inner.op_type}_{index}'}"
        for index, (result, output) in passed_through:
            graph.node.append(helper.make_node("Identity", [result], [output],
                                               name=f"{node.name}/{taken}/output_{index}"))


def _name_results(branch: onnx.GraphProto, outputs: Sequence[str]) -> list[tuple[int, tuple[str, str]]]:
    """Rename, in ``branch``, each result one of its nodes makes to the If output it becomes
    (an Identity could not carry it: before opset 14 Identity takes tensors only, and
    sequences and optionals would be refused). The results left: (index, (result, output))."""
    made = {t for inner in branch.node for t in inner.output if t}
    results = [result.name for result in branch.output]
    renames: dict[str, str] = {}
    left = []
    for index, (result, output) in enumerate(zip(results, outputs, strict=False)):
        if not output:
            continue
        if result in made and result not in renames:
            renames[result] = output
        else:
            left.append((index, (renames.get(result, result), output)))
    _rename_values(branch, renames)
    return left


def _rename_values(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Rename values in ``graph`` and the subgraphs that read them (ONNX names are unique
    across nested scopes, so nothing shadows them)."""
    if not renames:
        return
    for inner in graph.node:
        for slots in (inner.input, inner.output):
            for position, name in enumerate(slots):
                if name in renames:
                    slots[position] = renames[name]
        for attribute in inner.attribute:
            for subgraph in (attribute.g, *attribute.graphs) if attribute.HasField("g") else attribute.graphs:
                _rename_values(subgraph, renames)


def _value_info(name: str, value: Any, declared: onnx.TypeProto | None) -> onnx.ValueInfoProto:
    """An input of the rest, typed by what was observed; an empty sequence has no element to
    type it, so it keeps the type the prefix's plan declares for it."""
    if isinstance(value, np.ndarray):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return helper.make_tensor_sequence_value_info(name, helper.np_dtype_to_tensor_dtype(value[0].dtype), None)
    if isinstance(value, list) and declared is not None and _element_type(declared) is not None:
        return helper.make_tensor_sequence_value_info(name, _element_type(declared), None)  # type: ignore[arg-type]
    raise UnsupportedModelError(
        f"tensor {name!r}: the rest of the model reads it, but neither the observed "
        f"{type(value).__name__} nor the model's declared type says its ONNX type")


def _element_type(declared: onnx.TypeProto) -> int | None:
    """The element type of a declared sequence of tensors, when it is known."""
    if declared.WhichOneof("value") != "sequence_type":
        return None
    element = declared.sequence_type.elem_type
    if element.WhichOneof("value") != "tensor_type" or not element.tensor_type.elem_type:
        return None
    return int(element.tensor_type.elem_type)
