"""batch_separable: can the batch be split along axis 0 and the outputs concatenated?

The rules are listed on :class:`BatchSeparablePass`; :func:`analyze` is the analysis
behind it (the states of every tensor and every offending node), and
``batch/rules.py`` holds the per-op rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from hyperion.errors import UnsupportedModelError
from hyperion.ir import DEFAULT_DOMAIN, Graph
from hyperion.passes._infra import Pass, PassResult, ensure
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
from hyperion.passes.program import Program


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
_RULE_DOMAINS = frozenset({DEFAULT_DOMAIN, "com.microsoft"})


def analyze(graph: Graph, order: Sequence[str] | None = None) -> BatchSeparability:
    """The state of every tensor and every node that mixes samples across axis 0,
    visiting nodes in ``order`` (a topological order; default: the closest to the file's)."""
    if order is None:
        order = graph.topological_order(key=lambda n: graph.nodes[n].index)
    old_softmax = graph.opset is not None and graph.opset < _OLD_SOFTMAX_OPSET
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
        node = graph.nodes[name]
        slots = node.input_slots or ()
        ins = [states[i] if i else None for i in slots]
        outer = [states[t] for t in node.inputs if t not in slots]
        if all(s in (S, None) for s in ins + outer):
            continue
        result = _apply(RuleNode(node, ins + outer, graph, batch), old_softmax, offenders)
        for out in node.outputs:
            states[out] = result
    for name in graph.outputs:
        if states.get(name) is not B:
            offenders.append(Offender(name, "output", "is not batched, so chunks cannot be concatenated"))
    return BatchSeparability(batch, states, tuple(offenders))


def _apply(node: RuleNode, old_softmax: bool, offenders: list[Offender]) -> BatchState:
    op = node.op_type
    rule = RULES.get(op)
    if op in ("Softmax", "LogSoftmax", "Hardmax") and old_softmax:
        rule = axis_not_zero(1)
    if node.node.domain not in _RULE_DOMAINS:
        rule = None
    try:
        if rule is None:
            raise Refuse("has no batch-separability rule" if op not in ("If", "Loop", "Scan")
                          else "runs a subgraph over batched values")
        if V in node.states and op not in SHAPE_AWARE:
            raise Refuse("uses a value computed from the batch's shape as data")
        return rule(node)
    except Refuse as refusal:
        offenders.append(Offender(node.node.name, op, str(refusal)))
        return B if node.leads_with_batch() else S


class BatchSeparablePass(Pass):
    """Can the batch be split along axis 0 and the outputs concatenated? Refuses the
    graph if not, naming the first offender's node and op.

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

    1. elementwise ops (with broadcasting) keep the batch if every batched input has
       the output's rank and every shared input of that rank has leading dim 1;
    2. per-sample ops (Conv, pooling, inference-mode normalisation, attention,
       Resize, Dropout...) keep the batch when their data input is batched and the
       parameters are shared;
    3. an op with an axis keeps the batch unless that axis is 0: Softmax,
       LogSoftmax, Hardmax, LayerNormalization, Reduce*, ArgMax/ArgMin, CumSum, TopK,
       Concat, Split, Gather, Flatten(axis=0), Squeeze/Unsqueeze at 0 (or Squeeze
       without axes), Slice over axis 0 that drops samples, Pad/Tile on axis 0,
       Transpose whose perm moves axis 0 (before opset 13 Softmax & co. default to
       axis 1);
    4. MatMul keeps the batch when axis 0 of a batched operand is an output batch
       dim or A's row axis; Gemm when A is batched and not transposed;
    5. Reshape keeps the batch when the target's leading entry copies it (0, or -1
       with the leading dim unchanged, or a shape computed from the chunk's shape);
    6. BatchNormalization in training mode mixes samples (batch statistics);
    7. If/Loop/Scan, ops outside the default and com.microsoft domains, and any op
       without a rule, are refused when they read a batched or shape value; every
       graph output must be batched.

    Visits nodes in ``program.order`` when there is one. Writes
    ``program.batch_separability``. Postcondition: every tensor has a state and the
    graph is separable (it was refused otherwise).
    """

    name: ClassVar[str] = "batch_separable"

    def call(self, program: Program) -> PassResult:
        result = analyze(program.graph, program.order)
        modified = result != program.batch_separability
        program.batch_separability = result
        if not result.separable:
            raise UnsupportedModelError(refusal_message(result))
        return PassResult(program, modified)

    def ensures(self, program: Program) -> None:
        result = program.batch_separability
        ensure(result is not None and result.separable, self.name, "no separable analysis was recorded")
        assert result is not None
        ensure(set(program.graph.tensors) <= set(result.states), self.name, "a tensor has no batch state")


def refusal_message(result: BatchSeparability) -> str:
    first = result.offenders[0]
    more = f" (and {len(result.offenders) - 1} more)" if len(result.offenders) > 1 else ""
    return (f"the batch cannot be split along axis 0: {first.describe()}{more}; "
            "use mode='memory_opt' (or a larger memory_limit) instead of streaming")
