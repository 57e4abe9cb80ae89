"""The per-op rules of the ``batch_separable`` analysis (see that pass for the list).

A rule gets one node as :class:`RuleNode` -- positional inputs, their states,
shape facts, attributes and small constant values, all read from the IR -- and
returns the state of its outputs, or
raises :class:`Refuse` with the reason the op mixes samples across axis 0.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hyperion.ir import Graph, NodeInfo


class BatchState(str, enum.Enum):
    BATCHED = "batched"
    SHARED = "shared"
    SHAPE = "shape"


class Refuse(Exception):
    """The node mixes samples; the message says how."""


B, S, V = BatchState.BATCHED, BatchState.SHARED, BatchState.SHAPE


@dataclass(frozen=True)
class RuleNode:
    """One node as a rule sees it: positional inputs, their states, shapes, constants."""

    node: NodeInfo
    states: list[BatchState | None]       # per input slot, then outer-scope reads; None: omitted
    graph: Graph
    batch_size: int

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def inputs(self) -> tuple[str, ...]:
        """Inputs by position, "" for an omitted optional one."""
        return self.node.input_slots or ()

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.node.output_slots or ()

    def int_attribute(self, name: str, default: int) -> int:
        return self.node.int_attribute(name, default)

    def ints_attribute(self, name: str) -> list[int] | None:
        return self.node.ints_attribute(name)

    def shape(self, name: str) -> tuple[int | str, ...] | None:
        return self.graph.tensors[name].shape if name else None

    def lead(self, name: str) -> int | str | None:
        """The leading dim of ``name``, or None for a scalar or an unknown rank."""
        shape = self.shape(name)
        return shape[0] if shape else None

    def rank(self, index: int) -> int:
        shape = self.shape(self.inputs[index])
        if shape is None:
            raise Refuse(f"reads {self.inputs[index]!r}, whose rank is unknown")
        return len(shape)

    def out_rank(self) -> int:
        shape = self.shape(self.outputs[0])
        if shape is None:
            raise Refuse(f"writes {self.outputs[0]!r}, whose rank is unknown")
        return len(shape)

    def const(self, index: int) -> np.ndarray | None:
        if index >= len(self.inputs) or not self.inputs[index]:
            return None
        return self.graph.constant(self.inputs[index])

    def axis(self, default: int, rank: int, name: str = "axis") -> int:
        axis = self.int_attribute(name, default)
        return axis + rank if axis < 0 else axis

    def keeps_leading(self, index: int = 0) -> bool:
        """Shape facts: output 0's leading dim equals input ``index``'s."""
        lead = self.lead(self.inputs[index])
        return lead is not None and lead == self.lead(self.outputs[0])

    def leads_with_batch(self) -> bool:
        return self.lead(self.outputs[0]) == self.batch_size


def _all(state: BatchState) -> Callable[[RuleNode], BatchState]:
    return lambda node: state


def _elementwise(node: RuleNode) -> BatchState:
    present = [s for s in node.states if s is not None]
    if V in present:
        if B in present:
            raise Refuse("uses a value computed from the batch's shape as data")
        return V
    rank = node.out_rank()
    for i, state in enumerate(node.states):
        if state is B and node.rank(i) != rank:
            raise Refuse(f"broadcasts batched input {node.inputs[i]!r} so that axis 0 is not the batch")
        if state is S and node.rank(i) == rank and rank and node.lead(node.inputs[i]) != 1:
            raise Refuse(f"combines the batch with {node.inputs[i]!r}, which has a leading dim of its own")
    return B


def _per_sample(node: RuleNode) -> BatchState:
    """Data input 0 batched, everything else shared (or a shape for sizes)."""
    if node.states[0] is not B or any(s is B for s in node.states[1:]):
        raise Refuse("reads a batched tensor as a parameter")
    if not node.keeps_leading():
        raise Refuse("changes the size of axis 0")
    return B


def _per_sample_many(node: RuleNode) -> BatchState:
    """Attention and fused norms: input 0 batched; other batched inputs (masks,
    past keys, skips) have the samples on axis 0 too."""
    if node.states[0] is not B or not node.keeps_leading():
        raise Refuse("does not keep the samples of its first input on axis 0")
    lead = node.lead(node.inputs[0])
    for i, state in enumerate(node.states):
        if state is B and i < len(node.inputs) and node.lead(node.inputs[i]) != lead:
            raise Refuse(f"reads {node.inputs[i]!r} with another leading dim than the samples'")
    return B


def _gather_elements(node: RuleNode) -> BatchState:
    if node.axis(0, node.rank(0)) == 0:
        raise Refuse("gathers along axis 0, across samples")
    if any(s is not B for s in node.states[:2]):
        raise Refuse("pairs batched data with shared indices (or the reverse)")
    return B


def _one_hot(node: RuleNode) -> BatchState:
    if node.states[0] is not B or node.axis(-1, node.out_rank()) == 0:
        raise Refuse("puts the one-hot axis before the samples")
    return B


def axis_not_zero(default: int, name: str = "axis") -> Callable[[RuleNode], BatchState]:
    def rule(node: RuleNode) -> BatchState:
        if node.states[0] is V:
            return V
        if node.axis(default, node.rank(0), name) == 0:
            raise Refuse(f"works along axis 0, across samples ({name}={node.int_attribute(name, default)})")
        return _per_sample(node)
    return rule


def _reduce(node: RuleNode) -> BatchState:
    axes = node.ints_attribute("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        constant = node.const(1)
        if constant is None:
            raise Refuse("reduces over axes computed at run time")
        axes = [int(a) for a in constant.reshape(-1)]
    rank = node.rank(0)
    if not axes:
        if node.int_attribute("noop_with_empty_axes", 0):
            return B
        raise Refuse("reduces over every axis, axis 0 (the samples) included")
    if 0 in [a + rank if a < 0 else a for a in axes]:
        raise Refuse("reduces over axis 0, across samples")
    return B


def _axes_input_or_attr(node: RuleNode, index: int) -> list[int] | None:
    axes = node.ints_attribute("axes")
    if axes is not None:
        return axes
    constant = node.const(index)
    return None if constant is None else [int(a) for a in constant.reshape(-1)]


def _unsqueeze(node: RuleNode) -> BatchState:
    if node.states[0] is not B:
        return node.states[0] or S
    axes = _axes_input_or_attr(node, 1)
    rank = node.out_rank()
    if axes is None or 0 in [a + rank if a < 0 else a for a in axes]:
        raise Refuse("inserts an axis before the samples")
    return B


def _squeeze(node: RuleNode) -> BatchState:
    if node.states[0] is not B:
        return node.states[0] or S
    axes = _axes_input_or_attr(node, 1)
    rank = node.rank(0)
    if axes is None or 0 in [a + rank if a < 0 else a for a in axes]:
        raise Refuse("may squeeze axis 0, the samples (a chunk of one sample has size 1 there)")
    return B


def _transpose(node: RuleNode) -> BatchState:
    perm = node.ints_attribute("perm") or list(reversed(range(node.rank(0))))
    if perm[0] != 0:
        raise Refuse(f"moves axis 0, the samples (perm={perm})")
    return B


def _reshape(node: RuleNode) -> BatchState:
    data, target = node.states[0], node.states[1]
    if data is not B:
        if target is V:
            if node.leads_with_batch():
                return B
            raise Refuse("shapes a constant by the batch's shape without a leading batch dim")
        return data or S
    if target is V:
        if node.keeps_leading():
            return B
        raise Refuse("changes axis 0, mixing samples")
    shape = node.const(1)
    if shape is None or not shape.size:
        raise Refuse("reshapes to a shape computed at run time from shared values")
    lead = int(shape.reshape(-1)[0])
    if (lead == 0 and not node.int_attribute("allowzero", 0)) or (lead == -1 and node.keeps_leading()):
        return B
    if lead == -1:
        raise Refuse("reshapes with a leading -1 that changes axis 0, mixing samples")
    raise Refuse(f"reshapes to a fixed leading dim {lead}, which does not follow the chunk's batch")


def _expand_like(node: RuleNode) -> BatchState:
    data = node.states[0]
    if data is B:
        if node.rank(0) == node.out_rank() and node.keeps_leading() and node.states[1] is not B:
            return B
        raise Refuse("broadcasts the samples away from axis 0")
    if node.states[1] is V or data is V:
        if node.leads_with_batch():
            return B
        raise Refuse("builds a tensor from the batch's shape without a leading batch dim")
    return S


def _constant_of_shape(node: RuleNode) -> BatchState:
    if node.leads_with_batch():
        return B
    raise Refuse("builds a tensor from the batch's shape without a leading batch dim")


def _concat(node: RuleNode) -> BatchState:
    present = [s for s in node.states if s is not None]
    if B not in present:
        return V
    if V in present:
        raise Refuse("concatenates batched data with a value computed from the batch's shape")
    if node.axis(0, node.out_rank()) == 0:
        raise Refuse("concatenates along axis 0, the samples")
    if S in present and node.batch_size > 1:
        raise Refuse("concatenates the batch with a constant that has its own leading dim")
    return B


def _gather(node: RuleNode) -> BatchState:
    data, indices = node.states[0], node.states[1]
    axis = node.axis(0, node.rank(0))
    if data is B:
        if indices is not S or axis == 0:
            raise Refuse("gathers along axis 0, across samples")
        return B
    if data is V:
        if indices is B:
            raise Refuse("indexes a shape value by batched data")
        return V
    if indices is B and axis == 0:
        return B
    raise Refuse("gathers batched indices along a non-leading axis")


def _slice(node: RuleNode) -> BatchState:
    if node.states[0] is V:
        return V
    if node.states[0] is not B:
        if node.leads_with_batch():
            return B
        raise Refuse("slices a constant by bounds computed from the batch's shape")
    starts, ends, axes, steps = (node.const(i) for i in (1, 2, 3, 4))
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] and axes is None):
        raise Refuse("slices with bounds computed at run time")
    rank = node.rank(0)
    axes_list = [int(a) + rank if a < 0 else int(a) for a in (axes if axes is not None else range(len(starts)))]
    if 0 not in axes_list:
        return B
    i = axes_list.index(0)
    step = 1 if steps is None else int(steps[i])
    start, end = int(starts[i]), int(ends[i])
    if step == 1 and (start == 0 or start <= -node.batch_size) and end >= node.batch_size:
        return B
    raise Refuse(f"slices axis 0 (start {start}, end {end}, step {step}), dropping samples")


def _pad(node: RuleNode) -> BatchState:
    pads_attribute = node.ints_attribute("pads")
    pads = np.asarray(pads_attribute) if pads_attribute is not None else node.const(1)
    if pads is None:
        raise Refuse("pads by amounts computed at run time")
    axes = node.const(3)
    rank = node.rank(0)
    axes_list = list(range(rank)) if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes]
    if 0 in axes_list:
        i = axes_list.index(0)
        if int(pads[i]) or int(pads[i + len(axes_list)]):
            raise Refuse("pads axis 0, adding samples")
    return B


def _tile(node: RuleNode) -> BatchState:
    repeats = node.const(1)
    if repeats is None or int(repeats[0]) != 1:
        raise Refuse("tiles axis 0, repeating samples")
    return B


def _matmul(node: RuleNode) -> BatchState:
    a, b = node.states[0], node.states[1]
    transposed = node.int_attribute("transA", 0)   # com.microsoft FusedMatMul
    rank_a, rank_b, rank = node.rank(0), node.rank(1), node.out_rank()
    if a is B and not (rank_a == rank >= 2 and (rank_a >= 3 or not transposed)):
        raise Refuse("does not keep the samples of A on axis 0")
    if b is B and not rank_b == rank >= 3:
        raise Refuse("contracts over axis 0 of a batched operand")
    for index, state, rank_x in ((0, a, rank_a), (1, b, rank_b)):
        if state is S and rank_x == rank >= 3 and node.lead(node.inputs[index]) != 1:
            raise Refuse("broadcasts the batch against an operand with a leading dim of its own")
    return B


def _gemm(node: RuleNode) -> BatchState:
    if node.states[0] is not B or node.int_attribute("transA", 0) or any(s is B for s in node.states[1:]):
        raise Refuse("does not keep the samples of A on axis 0")
    if len(node.inputs) > 2 and node.inputs[2] and node.rank(2) == 2 and node.lead(node.inputs[2]) != 1:
        raise Refuse("adds a bias with a row per sample")
    return B


def _batch_norm(node: RuleNode) -> BatchState:
    if node.int_attribute("training_mode", 0) or len([o for o in node.outputs if o]) > 1:
        raise Refuse("normalises with batch statistics (training mode)")
    return _per_sample(node)


def _refuse(reason: str) -> Callable[[RuleNode], BatchState]:
    def rule(node: RuleNode) -> BatchState:
        raise Refuse(reason)
    return rule


_ELEMENTWISE = ("Add Sub Mul Div Pow Mod And Or Xor Equal Greater Less GreaterOrEqual LessOrEqual Where Max Min "
                "Sum Mean PRelu BitShift BitwiseAnd BitwiseOr BitwiseXor Clip Relu Sigmoid Tanh Erf Exp Log Sqrt "
                "Abs Neg Reciprocal Floor Ceil Round Sign Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh "
                "Cast CastLike Identity LeakyRelu Elu Selu Celu Gelu HardSigmoid HardSwish Softplus Softsign Mish "
                "ThresholdedRelu Not IsNaN IsInf BitwiseNot FastGelu BiasGelu QuickGelu Dropout").split()
_PER_SAMPLE = ("Conv ConvTranspose ConvInteger MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool "
               "GlobalLpPool LRN InstanceNormalization GroupNormalization DepthToSpace SpaceToDepth Resize "
               "Upsample SimplifiedLayerNormalization RMSNormalization").split()
_PER_SAMPLE_MANY = ("Attention MultiHeadAttention GroupQueryAttention SkipLayerNormalization "
                    "SkipSimplifiedLayerNormalization").split()
# Ops that compute each output element from the inputs' elements at the same (broadcast) index.
ELEMENTWISE = frozenset(_ELEMENTWISE)
# Ops that take a value computed from the batch's shape and stay right for every chunk.
SHAPE_AWARE = {*_ELEMENTWISE, "Shape", "Size", "Reshape", "Expand", "ConstantOfShape", "Unsqueeze", "Squeeze",
                "Concat", "Gather", "Slice", "Resize", "Upsample"}
RULES: dict[str, Callable[[RuleNode], BatchState]] = {
    **{op: _elementwise for op in _ELEMENTWISE}, **{op: _per_sample for op in _PER_SAMPLE},
    **{op: _per_sample_many for op in _PER_SAMPLE_MANY},
    "Shape": _all(V), "Size": _all(V), "Reshape": _reshape, "Expand": _expand_like,
    "ConstantOfShape": _constant_of_shape, "Transpose": _transpose, "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze, "Concat": _concat, "Gather": _gather, "Slice": _slice, "Pad": _pad, "Tile": _tile,
    "MatMul": _matmul, "FusedMatMul": _matmul, "Gemm": _gemm, "BatchNormalization": _batch_norm,
    "Flatten": axis_not_zero(1), "Softmax": axis_not_zero(-1), "LogSoftmax": axis_not_zero(-1),
    "Hardmax": axis_not_zero(-1), "LayerNormalization": axis_not_zero(-1), "ArgMax": axis_not_zero(0),
    "ArgMin": axis_not_zero(0), "TopK": axis_not_zero(-1), "Split": axis_not_zero(0),
    "GatherElements": _gather_elements, "OneHot": _one_hot,
    **{op: _reduce for op in ("ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
                              "ReduceLogSumExp ReduceSumSquare").split()},
    "Range": _refuse("counts up to a value computed from the batch's shape: each chunk would restart it"),
    "NonZero": _refuse("lists indices across every sample"),
}
