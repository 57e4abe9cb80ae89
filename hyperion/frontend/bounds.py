"""Upper bounds on the sizes of tensors that only the data decides.

onnx's shape inference leaves a tensor unsized when its size depends on values
seen at run time (NonZero, TopK with a computed k, If branches of different
shapes, ...). The op's semantics often still bound it; :func:`upper_bounds`
applies these rules, in topological order, so bounds flow through later ops:

1. NonZero: ``[rank, n]`` int64 with ``n <=`` the input's elements.
2. TopK: values and indices no larger than the input (``k <=`` the axis length).
3. NonMaxSuppression: ``[batches * classes * min(max_output_boxes_per_class, boxes), 3]``
   (``boxes`` when the maximum is not a constant).
4. Compress, Unique, Slice, Reduce*, ArgMax/ArgMin: no more elements than the input.
5. If: per output, the larger of the two branches' declared outputs (elementwise over
   the dims when the ranks agree, bytes alone otherwise).
6. Loop: a constant trip count times the body's per-iteration scan output; a
   loop-carried value as the body declares it.
7. Shape-preserving ops (unary elementwise, Softmax, Identity, ...) keep their input's
   bound; Cast scales it by the element size; Transpose permutes it; Reshape,
   Squeeze, Unsqueeze and Flatten keep its bytes; elementwise ops with broadcasting
   take the largest dim of their inputs; Gather takes its indices' bound.
8. Sequences: SplitToSequence holds its input's bytes, ConcatFromSequence and
   SequenceAt no more than their sequence, SequenceConstruct the sum of its inputs.
9. ZipMap: one map entry per score (at most MAP_ENTRY_BYTES each, the size of a
   node of the tree onnxruntime keeps the map in, with its key and value).

A tensor onnx's inference leaves unsized but onnxruntime's symbolic inference sized
is trusted, except downstream of If / Loop / Scan, whose outputs the latter guesses
from one branch or one iteration: there the bound comes from these rules, or none.
Anything else (Range, Expand, Tile, ConstantOfShape, Resize, Pad, OneHot with sizes
computed at run time, a Loop with a run-time trip count) has no bound: it is
re-planned once the value deciding it is observed (hyperion.replan).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from hyperion.frontend.build import ImportedModel
from hyperion.frontend.types import type_facts
from hyperion.ir import Graph, NodeInfo, TensorInfo

Shape = tuple[int, ...]
# A std::map<int64|string, float> node in onnxruntime: three pointers, colour, key, value
# (48 bytes on 64-bit glibc) rounded up to malloc's 64-byte chunk.
MAP_ENTRY_BYTES = 64
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
SHAPE_PRESERVING = frozenset({
    "Abs", "Acos", "Asin", "Atan", "Ceil", "Cos", "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "LogSoftmax", "Mish", "Neg", "Not",
    "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softmax", "Softplus", "Softsign",
    "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Dropout", "Clip", "CumSum", "LayerNormalization",
})
BYTES_PRESERVING = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"})
SHRINKING = frozenset({"Compress", "Unique", "Slice", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
                       "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax",
                       "ArgMin", "TopK"})
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "And", "Or", "Xor", "Equal",
                          "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Where", "PRelu", "BitShift"})


@dataclass(frozen=True)
class Bound:
    """At most ``nbytes`` bytes; ``shape``: an upper bound of every dim, when one is known."""

    nbytes: int
    shape: Shape | None = None


def guessed_tensors(imported: ImportedModel) -> set[str]:
    """Tensors sized only by onnxruntime's estimate downstream of If / Loop / Scan (see module doc)."""
    graph = imported.graph
    guessed: set[str] = set()
    for name in graph.topological_order():
        node = graph.nodes[name]
        tainted = node.op_type in CONTROL_FLOW or any(t in guessed for t in node.inputs)
        if tainted:
            guessed.update(t for t in node.outputs if type_facts(imported.value_types.get(t))[2] is None)
    return guessed


def unsized_tensors(imported: ImportedModel) -> list[str]:
    """Tensors a plan cannot size: no size at all, or a guessed one (:func:`guessed_tensors`)."""
    guessed = guessed_tensors(imported)
    return [t.name for t in imported.graph.tensors.values()
            if (t.nbytes is None or t.name in guessed) and (t.consumers or t.producer)]


def upper_bounds(imported: ImportedModel, unsized: Sequence[str]) -> dict[str, Bound]:
    """A bound for each tensor of ``unsized`` the rules give one (see module doc)."""
    graph, todo = imported.graph, set(unsized)
    known: dict[str, Bound] = {}
    subgraphs = _subgraphs(imported.source.proto, graph)
    for name in graph.topological_order():
        node = graph.nodes[name]
        if not any(t in todo for t in node.outputs):
            continue
        found = _node_bounds(graph, node, _facts(graph, todo, known), subgraphs.get(name, {}))
        for tensor, bound in found.items():
            if tensor in todo and bound is not None:
                known[tensor] = bound
    return known


class _Facts:
    """What is known of each tensor: its exact size, or a bound."""

    def __init__(self, graph: Graph, todo: set[str], bounds: Mapping[str, Bound]) -> None:
        self.graph, self.todo, self.bounds = graph, todo, bounds

    def bound(self, tensor: str) -> Bound | None:
        if tensor in self.todo:
            return self.bounds.get(tensor)
        info = self.graph.tensors.get(tensor)
        if info is None or info.nbytes is None:
            return None
        shape = info.shape if info.shape is not None and all(isinstance(d, int) for d in info.shape) else None
        return Bound(info.nbytes, shape)  # type: ignore[arg-type]

    def info(self, tensor: str) -> TensorInfo:
        return self.graph.tensors[tensor]


def _facts(graph: Graph, todo: set[str], bounds: Mapping[str, Bound]) -> _Facts:
    return _Facts(graph, todo, bounds)


def _itemsize_of(info: TensorInfo) -> int | None:
    try:
        return np.dtype(info.dtype).itemsize
    except TypeError:
        return None


def _of_shape(info: TensorInfo, shape: Shape | None, nbytes: int | None = None) -> Bound | None:
    size = _itemsize_of(info)
    if shape is not None and size is not None:
        return Bound(size * math.prod(shape), shape)
    return None if nbytes is None else Bound(nbytes)


def _elements(bound: Bound, info: TensorInfo) -> int | None:
    if bound.shape is not None:
        return math.prod(bound.shape)
    size = _itemsize_of(info)
    return None if not size else bound.nbytes // size


def _node_bounds(graph: Graph, node: NodeInfo, facts: _Facts,
                 branches: Mapping[str, list[onnx.GraphProto]]) -> dict[str, Bound | None]:
    op = node.op_type
    slots = node.input_slots or ()
    first = facts.bound(slots[0]) if slots and slots[0] else None
    out = [facts.info(t) for t in node.outputs]
    if op == "NonZero" and first is not None:
        x = facts.info(slots[0])
        n, rank = _elements(first, x), len(x.shape or ())
        return {} if n is None else {node.outputs[0]: Bound(8 * rank * n, (rank, n))}
    if op == "NonMaxSuppression":
        return {node.outputs[0]: _nms_bound(graph, node, facts)}
    if op == "If":
        return _if_bounds(node, facts, branches)
    if op == "Loop":
        return _loop_bounds(graph, node, facts, branches)
    if op == "ZipMap" and first is not None:
        entries = _elements(first, facts.info(slots[0]))
        return {} if entries is None else {node.outputs[0]: Bound(MAP_ENTRY_BYTES * entries)}
    if first is None and op not in BROADCASTING and not op.startswith("Sequence"):
        return {}
    if op in SHAPE_PRESERVING:
        return {t: _of_shape(info, first.shape, first.nbytes) for t, info in zip(node.outputs, out, strict=True)}
    if op == "Cast":
        elements = _elements(first, facts.info(slots[0]))
        size = _itemsize_of(out[0])
        return {} if elements is None or size is None else {node.outputs[0]: Bound(size * elements, first.shape)}
    if op == "Transpose" and first.shape is not None:
        perm = node.ints_attribute("perm") or list(reversed(range(len(first.shape))))
        return {node.outputs[0]: Bound(first.nbytes, tuple(first.shape[p] for p in perm))}
    if op in ("Squeeze", "Unsqueeze") and first.shape is not None:
        return {node.outputs[0]: Bound(first.nbytes, _squeezed(graph, node, first.shape))}
    if op in BYTES_PRESERVING:
        return {node.outputs[0]: Bound(first.nbytes)}
    if op in SHRINKING:
        return _shrinking(node, first, facts)
    if op in BROADCASTING:
        return {node.outputs[0]: _broadcast(node, facts, out[0])}
    if op == "Gather":
        return {node.outputs[0]: _gather(node, first, facts, out[0])}
    return _sequence_bounds(node, facts)


def _squeezed(graph: Graph, node: NodeInfo, shape: Shape) -> Shape | None:
    """The shape after Squeeze / Unsqueeze with constant axes (None when they are not)."""
    slots = node.input_slots or ()
    axes_value = graph.constant(slots[1]) if len(slots) > 1 and slots[1] else None
    axes = ([int(a) for a in axes_value.reshape(-1)] if axes_value is not None
            else node.ints_attribute("axes"))
    if axes is None:
        return None if node.op_type == "Unsqueeze" else tuple(d for d in shape if d != 1)
    if node.op_type == "Squeeze":
        dropped = {a % len(shape) for a in axes}
        return tuple(d for i, d in enumerate(shape) if i not in dropped)
    rank = len(shape) + len(axes)
    added = {a % rank for a in axes}
    dims = iter(shape)
    return tuple(1 if i in added else next(dims) for i in range(rank))


def _shrinking(node: NodeInfo, first: Bound, facts: _Facts) -> dict[str, Bound | None]:
    """Outputs with no more elements than the input (Unique/TopK indices are int64)."""
    elements = _elements(first, facts.info(node.input_slots[0]))  # type: ignore[index]
    bounds: dict[str, Bound | None] = {}
    for index, tensor in enumerate(node.output_slots or ()):
        if not tensor:
            continue
        if index == 0 and node.op_type not in ("ArgMax", "ArgMin"):
            same_rank = node.op_type in ("TopK", "Slice") or (node.op_type == "Compress" and "axis" in node.attributes)
            bounds[tensor] = Bound(first.nbytes, first.shape if same_rank else None)
        elif elements is not None:
            bounds[tensor] = Bound(8 * elements, first.shape if node.op_type == "TopK" else None)
    return bounds


def _broadcast(node: NodeInfo, facts: _Facts, out: TensorInfo) -> Bound | None:
    shapes = []
    for tensor in node.inputs:
        bound = facts.bound(tensor)
        if bound is None or bound.shape is None:
            return None
        shapes.append(bound.shape)
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    return _of_shape(out, tuple(max(dims) for dims in zip(*padded, strict=True)))


def _gather(node: NodeInfo, data: Bound, facts: _Facts, out: TensorInfo) -> Bound | None:
    indices = facts.bound(node.input_slots[1]) if len(node.input_slots or ()) > 1 else None  # type: ignore[index]
    if indices is None or indices.shape is None or data.shape is None:
        return None
    axis = node.int_attribute("axis", 0) % len(data.shape)
    return _of_shape(out, (*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]))


def _nms_bound(graph: Graph, node: NodeInfo, facts: _Facts) -> Bound | None:
    slots = node.input_slots or ()
    boxes, scores = facts.bound(slots[0]), facts.bound(slots[1])
    if boxes is None or scores is None or boxes.shape is None or scores.shape is None:
        return None
    batches, classes, count = scores.shape
    per_class = count
    if len(slots) > 2 and slots[2]:
        limit = graph.constant(slots[2])
        if limit is not None and limit.size == 1:
            per_class = min(count, max(int(limit.reshape(-1)[0]), 0))
    selected = batches * classes * per_class
    return Bound(8 * 3 * selected, (selected, 3))


def _subgraphs(proto: onnx.ModelProto, graph: Graph) -> dict[str, dict[str, list[onnx.GraphProto]]]:
    """Per If / Loop node of ``graph``: its subgraph attributes (by attribute name)."""
    from hyperion.frontend.build import unique_node_names

    found: dict[str, dict[str, list[onnx.GraphProto]]] = {}
    for name, node in zip(unique_node_names(proto.graph.node), proto.graph.node, strict=True):
        if node.op_type in ("If", "Loop") and name in graph.nodes:
            found[name] = {a.name: [a.g] for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    return found


def _declared(value: onnx.ValueInfoProto, facts: _Facts) -> Bound | None:
    """The size a subgraph output declares, or that of the outer tensor it passes through."""
    dtype, shape, nbytes = type_facts(value.type)
    if nbytes is not None:
        return Bound(nbytes, shape)  # type: ignore[arg-type]
    return facts.bound(value.name) if value.name in facts.graph.tensors else None


def _if_bounds(node: NodeInfo, facts: _Facts, branches: Mapping[str, list[onnx.GraphProto]]) -> dict[str, Bound | None]:
    then_graph, else_graph = branches.get("then_branch", [None])[0], branches.get("else_branch", [None])[0]
    if then_graph is None or else_graph is None:
        return {}
    bounds: dict[str, Bound | None] = {}
    for tensor, then_out, else_out in zip(node.output_slots or (), then_graph.output, else_graph.output, strict=False):
        a, b = _declared(then_out, facts), _declared(else_out, facts)
        if not tensor or a is None or b is None:
            continue
        shape = (tuple(max(x, y) for x, y in zip(a.shape, b.shape, strict=True))
                 if a.shape is not None and b.shape is not None and len(a.shape) == len(b.shape) else None)
        info = facts.info(tensor)
        bounds[tensor] = _of_shape(info, shape, max(a.nbytes, b.nbytes)) if shape else Bound(max(a.nbytes, b.nbytes))
    return bounds


def _loop_bounds(graph: Graph, node: NodeInfo, facts: _Facts,
                 branches: Mapping[str, list[onnx.GraphProto]]) -> dict[str, Bound | None]:
    body = branches.get("body", [None])[0]
    slots = node.input_slots or ()
    trips = graph.constant(slots[0]) if slots and slots[0] else None
    if body is None:
        return {}
    count = None if trips is None or trips.size != 1 else max(int(trips.reshape(-1)[0]), 0)
    carried = len(slots) - 2
    bounds: dict[str, Bound | None] = {}
    for index, tensor in enumerate(node.output_slots or ()):
        declared = _declared(body.output[index + 1], facts) if index + 1 < len(body.output) else None
        if not tensor or declared is None:
            continue
        if index < carried:
            bounds[tensor] = declared
        elif count is not None:
            shape = None if declared.shape is None else (count, *declared.shape)
            bounds[tensor] = Bound(count * declared.nbytes, shape)
    return bounds


def _sequence_bounds(node: NodeInfo, facts: _Facts) -> dict[str, Bound | None]:
    op = node.op_type
    inputs = [facts.bound(t) for t in node.input_slots or () if t]
    if op == "SplitToSequence" and inputs and inputs[0] is not None:
        return {node.outputs[0]: Bound(inputs[0].nbytes)}
    if op in ("ConcatFromSequence", "SequenceAt", "SequenceErase") and inputs and inputs[0] is not None:
        return {node.outputs[0]: Bound(inputs[0].nbytes)}
    if op in ("SequenceConstruct", "SequenceInsert") and inputs and all(b is not None for b in inputs):
        return {node.outputs[0]: Bound(sum(b.nbytes for b in inputs if b is not None))}
    if op == "SequenceEmpty":
        return {node.outputs[0]: Bound(0)}
    return {}


