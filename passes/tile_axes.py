"""Which axis of a step's outputs a free axis of its inputs becomes (the ``tile`` pass's regions).

A *free* axis is one along which every output element depends on the inputs at the same
index of that axis alone: slicing the inputs along it and running the op on the slices
gives the same slice of the output, element for element (the same kernel over the same
operands), so a chain of such ops can run tile by tile.

``passes/batch/rules.py`` answers the same question for axis 0 only, with states
(batched, shared, shape value) that do not carry an axis index; a rule here has to map
*any* axis (a Transpose moves it, a Reduce without keepdims shifts it, MatMul keeps its
batch dims and A's rows but contracts A's columns), so it is a compact table of its own.
Its elementwise ops are that module's list (:data:`ELEMENTWISE`), not a second one.

A rule gets the axis each input carries (``None``: read whole) and returns the axis of
every output, or ``None`` when the axis is not free. An input read whole that the op
would pair element for element with the tiled axis must be sliced too: the rule
*claims* it (only a region's boundary activations can be claimed; see ``Carrier``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hyperion.ir import Graph, NodeInfo
from hyperion.passes.batch.rules import ELEMENTWISE
from hyperion.passes.tile_patches import ROWS, window_of

Axes = dict[str, int]


@dataclass
class Carrier:
    """The axis each tensor of a region carries, grown node by node.

    ``claimable``: tensors read from outside the region that may be sliced (activations
    and graph inputs; weights and constants are read whole)."""

    graph: Graph
    claimable: frozenset[str]
    axes: Axes = field(default_factory=dict)
    spatial: bool = False    # rows of NCHW (axis 2) may pass Convs and pools, with halos (tile_patches.py)

    def axis(self, name: str) -> int | None:
        return self.axes.get(name) if name else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.graph.tensors[name].shape or ())

    def claim(self, name: str, axis: int) -> bool:
        """Slice ``name`` along ``axis`` too: only a boundary activation, only one axis."""
        if self.axes.get(name, axis) != axis or (name not in self.axes and name not in self.claimable):
            return False
        self.axes[name] = axis
        return True

    def whole_or_claimed(self, name: str, aligned: int) -> bool:
        """``name`` read whole where its dim ``aligned`` broadcasts (size 1, or absent), else claimed."""
        shape = self.shape(name)
        if aligned < 0 or shape[aligned] == 1:
            return self.axis(name) is None
        return self.claim(name, aligned)


Rule = Callable[[Carrier, NodeInfo], "int | None"]


def _inputs(node: NodeInfo) -> tuple[str, ...]:
    return node.input_slots or node.inputs


def _elementwise(carrier: Carrier, node: NodeInfo) -> int | None:
    """Numpy broadcasting: axes align from the right."""
    rank = len(carrier.shape(node.outputs[0]))
    present = [n for n in _inputs(node) if n]
    carried = {rank - len(carrier.shape(n)) + a for n in present if (a := carrier.axis(n)) is not None}
    if len(carried) != 1:
        return None
    axis = carried.pop()
    if carrier.shape(node.outputs[0])[axis] == 1:
        return None
    ok = all(carrier.whole_or_claimed(n, axis - (rank - len(carrier.shape(n)))) for n in present
             if carrier.axis(n) is None)
    return axis if ok else None


def _first_input_only(carrier: Carrier, node: NodeInfo) -> int | None:
    """The axis of input 0, when only input 0 carries it."""
    inputs = _inputs(node)
    if any(carrier.axis(n) is not None for n in inputs[1:]):
        return None
    return carrier.axis(inputs[0])


def _normalised(default: int, before_opset_13: int | None = None) -> Rule:
    """Softmax/LogSoftmax/LayerNormalization: free along the axes before ``axis``. (Before
    opset 13 Softmax normalises ``axis`` -- 1 by default then -- and every axis after it,
    so the axes before it are the free ones under either reading.)"""
    def rule(carrier: Carrier, node: NodeInfo) -> int | None:
        axis = _first_input_only(carrier, node)
        rank = len(carrier.shape(_inputs(node)[0]))
        legacy = before_opset_13 is not None and (carrier.graph.opset or 13) < 13
        normalised = node.int_attribute("axis", before_opset_13 if legacy else default)  # type: ignore[arg-type]
        normalised += rank if normalised < 0 else 0
        return axis if axis is not None and axis < normalised else None
    return rule


def _reduce(carrier: Carrier, node: NodeInfo) -> int | None:
    axis = _first_input_only(carrier, node)
    inputs = _inputs(node)
    axes = node.ints_attribute("axes")
    if axes is None and len(inputs) > 1 and inputs[1]:
        constant = carrier.graph.constant(inputs[1])
        axes = None if constant is None else [int(a) for a in constant.reshape(-1)]
    if axis is None or not axes:   # no axes: every axis reduced (or none, noop_with_empty_axes): not worth a rule
        return None
    rank = len(carrier.shape(inputs[0]))
    axes = [a + rank if a < 0 else a for a in axes]
    if axis in axes:
        return None
    return axis if node.int_attribute("keepdims", 1) else axis - sum(a < axis for a in axes)


def _transpose(carrier: Carrier, node: NodeInfo) -> int | None:
    axis = carrier.axis(_inputs(node)[0])
    rank = len(carrier.shape(_inputs(node)[0]))
    perm = node.ints_attribute("perm") or list(reversed(range(rank)))
    return None if axis is None else perm.index(axis)


def _matmul(carrier: Carrier, node: NodeInfo) -> int | None:
    """Batch dims (broadcast like elementwise ops), A's rows and B's columns are free; the
    contracted axis is not."""
    a, b = _inputs(node)[:2]
    rank_a, rank_b = len(carrier.shape(a)), len(carrier.shape(b))
    rank = len(carrier.shape(node.outputs[0]))
    if min(rank_a, rank_b) < 2:   # a vector operand: its one axis is the contracted one
        return None
    wanted: set[int] = set()
    for name, own_rank, matrix_axis, out_axis in ((a, rank_a, rank_a - 2, rank - 2), (b, rank_b, rank_b - 1, rank - 1)):
        axis = carrier.axis(name)
        if axis is None:
            continue
        if axis == matrix_axis:
            wanted.add(out_axis)
        elif axis < own_rank - 2:
            wanted.add(axis + rank - own_rank)
        else:
            return None            # the contracted axis
    if len(wanted) != 1:
        return None
    out = wanted.pop()
    if out >= rank - 2:            # rows of A (or columns of B): the other operand is read whole
        return out if all(carrier.axis(n) is None or n == (a if out == rank - 2 else b) for n in (a, b)) else None
    for name, own_rank in ((a, rank_a), (b, rank_b)):
        if carrier.axis(name) is None and not carrier.whole_or_claimed(name, out - (rank - own_rank)):
            return None
    return out


def _reshape(carrier: Carrier, node: NodeInfo) -> int | None:
    """Free when the axis keeps its place, its length and what lies before and after it,
    and the target shape leaves it to the input (0, or the one -1): a tile reshapes alike."""
    data, target = _inputs(node)[:2]
    axis = _first_input_only(carrier, node)
    spec = carrier.graph.constant(target)
    before, after = carrier.shape(data), carrier.shape(node.outputs[0])
    if axis is None or spec is None or axis >= len(after) or axis >= spec.size:
        return None
    entry = int(spec.reshape(-1)[axis])
    leaves_it = entry == -1 or (entry == 0 and not node.int_attribute("allowzero", 0))
    kept = after[axis] == before[axis] and math.prod(before[:axis]) == math.prod(after[:axis])
    return axis if leaves_it and kept else None


RULES: dict[str, Rule] = {
    **{op: _elementwise for op in ELEMENTWISE},
    "Softmax": _normalised(-1, 1), "LogSoftmax": _normalised(-1, 1), "LayerNormalization": _normalised(-1),
    **{op: _reduce for op in ("ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
                              "ReduceLogSumExp ReduceSumSquare").split()},
    "Transpose": _transpose, "MatMul": _matmul, "Reshape": _reshape,
}


def _windowed(carrier: Carrier, node: NodeInfo) -> int | None:
    """Conv, ConvTranspose, MaxPool, AveragePool, Resize, Upsample: rows of input 0 become
    rows of the output (with a halo); the weight and bias (roi, scales) are read whole."""
    inputs = _inputs(node)
    if carrier.axis(inputs[0]) != ROWS or any(carrier.axis(n) is not None for n in inputs[1:] if n):
        return None
    return ROWS if window_of(carrier.graph, node) is not None else None


def _concat(carrier: Carrier, node: NodeInfo) -> int | None:
    """Concat along another axis than the rows: every input carries the rows."""
    rank = len(carrier.shape(node.outputs[0]))
    axis = node.int_attribute("axis", 1)
    if axis % rank == ROWS:
        return None
    return ROWS if all(carrier.axis(n) == ROWS or carrier.claim(n, ROWS) for n in _inputs(node) if n) else None


# Ops that keep rows only as patches with halos (or a channel-wise op, free but for no rule above).
SPATIAL_RULES: dict[str, Rule] = {
    **{op: _windowed for op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "Resize", "Upsample")},
    "Concat": _concat, "BatchNormalization": _first_input_only, "LRN": _first_input_only,
}


def carry(carrier: Carrier, node: NodeInfo) -> bool:
    """Extend ``carrier`` over ``node``: every output gets the axis; False when it is not free."""
    rule = RULES.get(node.op_type) if node.is_default_domain or node.op_type in ELEMENTWISE else None
    if carrier.spatial and node.is_default_domain and node.op_type in SPATIAL_RULES:
        rule = SPATIAL_RULES[node.op_type]
    if rule is None or any(carrier.graph.tensors[n].shape is None for n in (*_inputs(node), *node.outputs) if n):
        return False
    if all(carrier.axis(n) is None for n in _inputs(node)):
        return False              # reads nothing tiled: it would run whole on every tile
    axis = rule(carrier, node)
    if axis is None:
        return False
    for name in node.outputs:
        if name:
            carrier.axes[name] = axis
    return True
