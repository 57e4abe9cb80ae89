"""batch_separable: can the batch be split along axis 0 and the outputs concatenated?

Every tensor gets a state:

* ``batched`` -- axis 0 is the sample axis: graph inputs whose leading dim is the
  batch size (an input with leading dim 1 in a larger batch is broadcast, so
  shared), and what per-sample ops compute from them;
* ``shared`` -- the same for every sample: weights, constants, what is computed
  from them alone;
* ``shape`` -- a value computed from the *shape* of a batched tensor (Shape,
  Size and arithmetic on them). Each chunk computes it from its own shape, so
  it is right where it is used as a shape (Reshape, Expand, ConstantOfShape,
  Resize sizes), and wrong as data (Range over it, Add to a batched tensor).

Rules, for a node with a batched or shape input:

* elementwise ops (with broadcasting) keep the batch if every batched input has
  the output's rank and every shared input of that rank has leading dim 1;
* per-sample ops (Conv, pooling, inference-mode normalisation, attention,
  Resize, Dropout...) keep the batch when their data input is batched and the
  parameters are shared;
* an op with an axis keeps the batch unless that axis is 0: Softmax,
  LogSoftmax, Hardmax, LayerNormalization, Reduce*, ArgMax/ArgMin, CumSum, TopK,
  Concat, Split, Gather, Flatten(axis=0), Squeeze/Unsqueeze at 0 (or Squeeze
  without axes), Slice over axis 0 that drops samples, Pad/Tile on axis 0,
  Transpose whose perm moves axis 0;
* MatMul keeps the batch when axis 0 of a batched operand is an output batch
  dim or A's row axis; Gemm when A is batched and not transposed;
* Reshape keeps the batch when the target's leading entry copies it (0, or -1
  with the leading dim unchanged, or a shape computed from the chunk's shape);
* BatchNormalization in training mode mixes samples (batch statistics);
* If/Loop/Scan, and any op without a rule, are refused when they read a
  batched or shape value; every graph output must be batched.

The analysis (:func:`analyze`) returns the states and every offending node; the
pass refuses the graph, naming the first offender's node and op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from hyperion.passes import Pass, PassResult
from hyperion.passes.batch.rules import (
    RULES,
    SHAPE_AWARE,
    B,
    BatchState,
    Refuse,
    RuleNode,
    S,
    V,
    axis_not_zero,
)
from onnx import NodeProto

from hyperion.errors import UnsupportedModelError
from hyperion.ir import Graph, Program


@dataclass(frozen=True)
class Offender:
    node: str
    op_type: str
    reason: str

    def describe(self) -> str:
        return f"node {self.node!r} ({self.op_type}) {self.reason}"


@dataclass(frozen=True)
class BatchSeparability:
    batch_size: int
    states: Mapping[str, BatchState]
    offenders: tuple[Offender, ...]

    @property
    def separable(self) -> bool:
        return not self.offenders

    @property
    def batched(self) -> frozenset[str]:
        return frozenset(n for n, s in self.states.items() if s is BatchState.BATCHED)


_OLD_SOFTMAX_OPSET = 13  # before opset 13 Softmax & co. default to axis 1


def analyze(graph: Graph, order: Sequence[str], nodes: Mapping[str, NodeProto],
            constants: Mapping[str, np.ndarray], opset: int = 17) -> BatchSeparability:
    """The state of every tensor and every node that mixes samples across axis 0."""
    batch = max((int(s[0]) for s in (graph.tensors[i].shape for i in graph.inputs)
                 if s and isinstance(s[0], int)), default=1)
    states: dict[str, BatchState] = {name: S for name in graph.tensors}
    offenders: list[Offender] = []
    for name in graph.inputs:
        shape = graph.tensors[name].shape
        if shape and (shape[0] == batch or (batch > 1 and shape[0] != 1)):
            states[name] = B
            if shape[0] != batch:
                offenders.append(Offender(name, "input", f"has leading dim {shape[0]}, not the batch's {batch}"))
    for name in order:
        proto = nodes[name]
        ins = [states[i] if i else None for i in proto.input]
        outer = [states[t] for t in graph.nodes[name].inputs if t not in proto.input]
        if all(s in (S, None) for s in ins + outer):
            continue
        result = _apply(RuleNode(proto, ins + outer, graph, constants, batch), name, opset, offenders)
        for out in proto.output:
            if out:
                states[out] = result
    for name in graph.outputs:
        if states.get(name) is not B:
            offenders.append(Offender(name, "output", "is not batched, so chunks cannot be concatenated"))
    return BatchSeparability(batch, states, tuple(offenders))


def _apply(node: RuleNode, name: str, opset: int, offenders: list[Offender]) -> BatchState:
    op = node.proto.op_type
    rule = RULES.get(op)
    if op in ("Softmax", "LogSoftmax", "Hardmax") and opset < _OLD_SOFTMAX_OPSET:
        rule = axis_not_zero(1)
    if node.proto.domain not in ("", "ai.onnx", "com.microsoft"):
        rule = None
    try:
        if rule is None:
            raise Refuse("has no batch-separability rule" if op not in ("If", "Loop", "Scan")
                          else "runs a subgraph over batched values")
        if V in node.states and op not in SHAPE_AWARE:
            raise Refuse("uses a value computed from the batch's shape as data")
        return rule(node)
    except Refuse as refusal:
        offenders.append(Offender(name, op, str(refusal)))
        return B if node.leads_with_batch() else S


def constant_values(model: onnx.ModelProto, max_bytes: int = 4096) -> dict[str, np.ndarray]:
    """Small initializers and Constant outputs: the values rules read (shapes, axes, pads)."""
    values: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() <= max_bytes:
            values[tensor.name] = onnx.numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
            elif attr.name in ("value_ints", "value_int", "value_floats", "value_float"):
                values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attr))
    return values


@dataclass(frozen=True)
class BatchSeparablePass(Pass):
    """Refuses a graph whose ops mix samples across axis 0; the analysis goes to
    ``program.notes['batch_separability']``."""

    name: ClassVar[str] = "batch_separable"
    nodes: Mapping[str, NodeProto]
    constants: Mapping[str, np.ndarray]
    opset: int = 17

    def call(self, program: Program) -> PassResult:
        order = program.order or program.graph.file_order()
        result = analyze(program.graph, order, self.nodes, self.constants, self.opset)
        program.notes["batch_separability"] = result
        if not result.separable:
            raise UnsupportedModelError(refusal_message(result))
        return PassResult(program, False)


def refusal_message(result: BatchSeparability) -> str:
    first = result.offenders[0]
    more = f" (and {len(result.offenders) - 1} more)" if len(result.offenders) > 1 else ""
    return (f"the batch cannot be split along axis 0: {first.describe()}{more}; "
            "use mode='memory_opt' (or a larger memory_limit) instead of streaming")
