"""How the tile pass may split one step: per op, the axis whose tiles keep results exact.

Every rule splits the step's *output* along an axis no output element is summed
over, so each output element is computed by the same kernel over the same
operands in the same order as untiled:

* MatMul ``A[..., K] @ W[K, N]``: output columns; a tile reads columns of W,
  strided in the file: one read per row of W, or, for rows of at most
  ``COALESCED_ROW_BYTES``, one read for a run of rows, the bytes between the tile's
  columns landing in a buffer of one row (``Geometry.skip_bytes``);
* Gemm: output columns; with ``transB`` W is stored ``[N, K]`` and a tile is a
  contiguous block of its rows; a bias of N values is sliced with it;
* Conv (``group == 1``): output channels; OIHW weight tiles are contiguous, and
  the bias is sliced with them.

A bias may be a weight (read whole: it is small) or an activation (a weight passed
through an Identity, as exporters share biases): either way it is sliced per tile.

Tiles are multiples of ``TILE_UNIT`` wide (MLAS packs GEMM operands in panels of
16 columns, and blocks NCHWc convolutions by 8 or 16 channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hyperion.ir import Graph, NodeInfo, TensorInfo
from hyperion.passes.memory.costs import MLAS_PANEL_COLUMNS

TILE_UNIT = 16
_ITEM = 4  # float32 only
# A column tile of a weight whose rows are at most a page long is read with one positioned
# read (``preadv``) per run of rows: copying the other columns' bytes, less than a page a
# row, costs less than a system call per row (external_data's 256x256 MatMuls at the
# smallest cap: 256 reads of 64 bytes per tile).
COALESCED_ROW_BYTES = 4096


@dataclass(frozen=True)
class Geometry:
    """How a step's output and weight split along the tiled axis."""

    node: str
    weight: str
    bias: str | None             # sliced with the weight (Gemm C, Conv B); None: absent or broadcast whole
    output: str
    size: int                    # length of the tiled axis
    output_axis: int             # of the output
    weight_axis: int             # of the weight: 0 -> a tile is contiguous in the file
    weight_shape: tuple[int, ...]
    in_place: bool               # output slices along the axis are contiguous: tiles written straight in
    output_outer: int            # output elements per index of the tiled axis
    packed: bool                 # onnxruntime pre-packs the weight (MatMul, Gemm)

    @property
    def unit(self) -> int:
        return TILE_UNIT if self.size >= TILE_UNIT else 1

    def tile_shape(self, width: int) -> tuple[int, ...]:
        shape = list(self.weight_shape)
        shape[self.weight_axis] = width
        return tuple(shape)

    @property
    def skip_bytes(self) -> int:
        """A column tile read in runs of rows: a buffer of one weight row, which the bytes
        between the tile's columns are read into (and dropped); 0: one read per row."""
        if self.weight_axis != 1:
            return 0
        row = self.weight_shape[1] * _ITEM
        return row if row <= COALESCED_ROW_BYTES else 0

    def staging_bytes(self, width: int) -> int:
        """The buffer one weight tile is read into (and its skipped bytes), plus the output
        tile buffer when not in place."""
        weight = math.prod(self.tile_shape(width)) * _ITEM + self.skip_bytes
        return weight + (0 if self.in_place else self.output_outer * width * _ITEM)

    @property
    def initializers_in_place(self) -> bool:
        """Sessions use the weight tile in place (MatMul, Gemm: the kernel packs it). A Conv's
        tile is handed over as a copy: onnxruntime reorders convolution weights (NCHWc) while
        optimizing the graph, from the data the model declares, before any override applies."""
        return self.packed

    def accounted_bytes(self, width: int, fed: bool = False) -> int:
        """The tile's buffers, plus onnxruntime's copy of the weight tile when it makes one:
        never when ``fed`` (the tile an input of a session kept per tile width, as in a fed
        plan: onnxruntime reads the buffer handed to it)."""
        copy = 0 if self.initializers_in_place or fed else math.prod(self.tile_shape(width)) * _ITEM
        return self.staging_bytes(width) + copy

    def relaid_bytes(self, width: int) -> int:
        """While a relaid tile's session is first built: the tile read into its buffer, and
        three times the packed tile (``segment.py`` rule 13: the packed copy, and the
        tile twice more while onnxruntime writes and maps it); later, one packed tile."""
        return self.staging_bytes(width) + 3 * self.held_bytes(width, True)

    def held_bytes(self, width: int, prepack: bool) -> int:
        """What the tile's session holds for it: the packed copy, as ``memory/costs.py`` prices it;
        unpacked (a fed plan), nothing beyond the tile's buffers."""
        if not (prepack and self.packed):
            return self.accounted_bytes(width, fed=not prepack)
        rows, cols = self.tile_shape(width)
        panels = max(rows * _round_up(cols, MLAS_PANEL_COLUMNS), cols * _round_up(rows, MLAS_PANEL_COLUMNS))
        return panels * _ITEM


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def geometry(graph: Graph, node: NodeInfo) -> Geometry | None:
    """How ``node`` splits, or None when no rule applies."""
    if not node.is_default_domain or len(node.outputs) != 1:
        return None
    rule = {"MatMul": _matmul, "Gemm": _gemm, "Conv": _conv}.get(node.op_type)
    if rule is None:
        return None
    slots = node.input_slots or node.inputs
    tensors = [graph.tensors.get(name) if name else None for name in slots]
    output = graph.tensors[node.outputs[0]]
    if len(tensors) < 2 or tensors[1] is None or not graph.is_weight(tensors[1].name) or not _sized(output):
        return None
    if any(t is not None and t.dtype != "float32" for t in (*tensors, output)) or not _sized(tensors[1]):
        return None
    return rule(graph, node, tensors, output)


def _sized(tensor: TensorInfo | None) -> bool:
    return tensor is not None and tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape)


def _shape(tensor: TensorInfo) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape or ())


def _matmul(graph: Graph, node: NodeInfo, inputs: list[TensorInfo | None], output: TensorInfo) -> Geometry | None:
    weight, out = _shape(inputs[1]), _shape(output)  # type: ignore[arg-type]
    if len(weight) != 2 or len(out) < 1 or graph.is_weight(inputs[0].name):  # type: ignore[union-attr]
        return None
    outer = math.prod(out[:-1])
    return Geometry(node.name, inputs[1].name, None, output.name, weight[1], len(out) - 1, 1, weight,  # type: ignore[union-attr]
                    outer == 1, outer, True)


def _gemm(graph: Graph, node: NodeInfo, inputs: list[TensorInfo | None], output: TensorInfo) -> Geometry | None:
    weight, out = _shape(inputs[1]), _shape(output)  # type: ignore[arg-type]
    if len(weight) != 2 or len(out) != 2 or graph.is_weight(inputs[0].name):  # type: ignore[union-attr]
        return None
    size = out[1]
    bias = inputs[2] if len(inputs) > 2 else None
    sliced_bias = None
    if bias is not None:
        if not _sized(bias):
            return None
        elements = math.prod(_shape(bias))
        if elements == size and size > 1:
            sliced_bias = bias.name
        elif elements != 1:  # a bias per output element: not worth a rule
            return None
    axis = 0 if node.int_attribute("transB", 0) else 1
    return Geometry(node.name, inputs[1].name, sliced_bias, output.name, size, 1, axis, weight,  # type: ignore[union-attr]
                    out[0] == 1, out[0], True)


def _conv(graph: Graph, node: NodeInfo, inputs: list[TensorInfo | None], output: TensorInfo) -> Geometry | None:
    weight, out = _shape(inputs[1]), _shape(output)  # type: ignore[arg-type]
    if node.int_attribute("group", 1) != 1 or len(out) < 3 or graph.is_weight(inputs[0].name):  # type: ignore[union-attr]
        return None
    bias = inputs[2] if len(inputs) > 2 else None
    if bias is not None and (not _sized(bias) or math.prod(_shape(bias)) != out[1]):
        return None
    return Geometry(node.name, inputs[1].name, None if bias is None else bias.name, output.name, out[1], 1, 0,  # type: ignore[union-attr]
                    weight, out[0] == 1, out[0] * math.prod(out[2:]), False)
