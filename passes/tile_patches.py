"""Spatial patches: regions of convolutions and pools run patch by patch along rows, with halos.

A free axis (``tile_axes.py``) maps every output index to the same input index, so a
Conv or a pool can never hold one: output row ``r`` of a Conv reads input rows
``r*s - p_top`` to ``r*s - p_top + (k-1)*d`` (stride, padding, kernel, dilation). A
*spatial* region (MCUNetV2's patch-based inference) still runs such a chain patch by
patch along the rows (axis 2 of NCHW): each patch's output rows are propagated back
through the region, every tensor in it holding, per patch, the union of the rows its
readers need (the *halo* around the patch), and each Conv or pool is handed exactly the
rows its outputs need -- cut from what its producer made (a *crop*) and, where the patch
touches the top or bottom of the tensor, the rows of padding the whole Conv would add
there (a *pad*). Each output pixel is then computed from the same operands as whole.
A Resize or Upsample by an integer row scale makes whole runs of rows from the input rows
it reads (:class:`Upsampling`): a patch keeps, by a crop, the rows it made as whole.

This module is the geometry: which ops keep rows (the carrier's spatial rules) and, for
a region cut into patches, the rows every tensor holds and every edge reads, per patch
(:func:`patch_plan`). The cost and the choice of regions stay in ``tile_regions.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from hyperion.ir import Graph, NodeInfo

ROWS = 2           # NCHW: the spatial axis patches cut
Rows = tuple[int, int]
OUTPUT = ""        # a crop's reader when the rows go out of the region (its output)
# What a pool's padding holds: MaxPool ignores it, so the lowest float never wins a
# window that holds a real value; Conv and AveragePool (count_include_pad) add zeros.
LOWEST_FLOAT32 = -3.4028234663852886e38


@dataclass(frozen=True)
class Window:
    """How output rows of a sliding-window op map to input rows (the H dims of its attributes)."""

    kernel: int
    stride: int
    dilation: int
    pad_top: int
    transposed: bool = False       # a ConvTranspose whose kernel equals its stride: no overlap

    def input_rows(self, rows: Rows, size: int) -> tuple[Rows, Rows]:
        """(the input rows ``rows`` of the output read, clipped to the input; the padding
        rows the op adds above and below them)."""
        start, stop = rows
        if self.transposed:
            return (start // self.stride, -(-stop // self.stride)), (0, 0)
        first = start * self.stride - self.pad_top
        last = (stop - 1) * self.stride + (self.kernel - 1) * self.dilation + 1 - self.pad_top
        return (max(first, 0), min(last, size)), (max(0, -first), max(0, last - size))

    def computed(self, rows: Rows, size: int) -> Rows:
        """The output rows the op makes to give ``rows``: a transposed Conv makes whole
        kernels of rows."""
        if not self.transposed:
            return rows
        start, stop = rows
        return start - start % self.stride, min(size, -(-stop // self.stride) * self.stride)


@dataclass(frozen=True)
class Upsampling:
    """How output rows of a Resize or Upsample map to input rows when its row scale is an
    integer ``scale``: a run of input rows makes ``scale`` output rows each, so a patch runs
    the op on whole input rows and keeps the output rows it needs (a crop of what it made).

    Nearest (asymmetric coordinates with ``floor``, or half-pixel ones rounding to the nearest)
    copies input row ``r // scale`` to output row ``r``. Linear interpolates output row ``r``
    between input rows ``floor(x)`` and ``floor(x) + 1``, ``x = r / scale - offset`` (``offset``:
    0 asymmetric, ``(1 - 1/scale) / 2`` half-pixel), clamped at the tensor's edges -- so a patch
    also reads the input rows either side of what it keeps, and the rows it makes next to the
    edge of its input slice, clamped there and not in the whole tensor, are never kept."""

    scale: int
    linear: bool = False
    offset: Fraction = Fraction(0)

    def _reads(self, rows: Rows, size: int) -> Rows:
        start, stop = rows
        if not self.linear:
            return start // self.scale, -(-stop // self.scale)
        first = math.floor(Fraction(start, self.scale) - self.offset)
        last = math.floor(Fraction(stop - 1, self.scale) - self.offset) + 2
        return max(first, 0), min(last, size // self.scale)

    def computed(self, rows: Rows, size: int) -> Rows:
        """The output rows the op makes to give ``rows``: ``scale`` for each input row it reads."""
        first, last = self._reads(rows, size)
        return first * self.scale, min(size, last * self.scale)

    def input_rows(self, rows: Rows, size: int) -> tuple[Rows, Rows]:
        """The input rows that make ``rows`` (rows :meth:`computed` gave); no padding."""
        start, stop = rows
        return (start // self.scale, -(-stop // self.scale)), (0, 0)


def _text(value: object, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


# Coordinate transformations and nearest modes under which output row ``r`` of an integer
# row scale reads input row ``r // scale``: asymmetric ``x = r / s`` floored; half-pixel
# ``x = (r + 0.5) / s - 0.5`` lies within 0.5 - 0.5/s of ``r // s``, so rounding gives it.
_NEAREST_BLOCKS = frozenset({("asymmetric", "floor")} | {
    (mode, rounding) for mode in ("half_pixel", "pytorch_half_pixel") for rounding in ("round_prefer_floor",
                                                                                        "round_prefer_ceil")})
_LINEAR_OFFSETS = {"asymmetric": Fraction(0), "half_pixel": Fraction(1, 2), "pytorch_half_pixel": Fraction(1, 2)}


def upsampling_of(graph: Graph, node: NodeInfo) -> Upsampling | None:
    """The row mapping of a Resize (scales given, constant) or Upsample over NCHW whose row
    scale is an integer and whose batch and channel scales are 1; None for any other."""
    shape = graph.tensors[node.inputs[0]].shape
    slots = node.input_slots or node.inputs
    if node.op_type == "Upsample" or (graph.opset or 11) < 11:
        scales = graph.constant(slots[1]) if len(slots) > 1 and slots[1] else node.attributes.get("scales")
        coordinates, rounding = "asymmetric", "floor"   # Upsample and Resize-10: x = r / s, truncated
    else:
        if len(slots) < 3 or not slots[2] or (len(slots) > 3 and slots[3]) or node.int_attribute("antialias", 0):
            return None   # sizes, not scales: a patch makes fewer rows
        scales = graph.constant(slots[2])
        coordinates = _text(node.attributes.get("coordinate_transformation_mode"), "half_pixel")
        rounding = _text(node.attributes.get("nearest_mode"), "round_prefer_floor")
    if shape is None or len(shape) != 4 or scales is None:
        return None
    values = [float(v) for v in np.asarray(scales).reshape(-1)]
    if len(values) != 4 or values[0] != 1 or values[1] != 1 or values[ROWS] < 1 or not values[ROWS].is_integer():
        return None
    scale, mode = int(values[ROWS]), _text(node.attributes.get("mode"), "nearest")
    if mode == "nearest" and (coordinates, rounding) in _NEAREST_BLOCKS:
        return Upsampling(scale)
    if mode in ("linear", "bilinear") and coordinates in _LINEAR_OFFSETS:
        return Upsampling(scale, True, _LINEAR_OFFSETS[coordinates] * (1 - Fraction(1, scale)))
    return None


def _h(values: list[int] | None, default: int) -> int:
    return default if not values else int(values[0])


def window_of(graph: Graph, node: NodeInfo) -> Window | Upsampling | None:
    """The row window of a 2-D Conv, ConvTranspose, MaxPool or AveragePool over NCHW, the
    row mapping of a Resize or Upsample, or None when the op maps rows in no way this module
    can patch exactly."""
    if node.is_default_domain and node.op_type in ("Resize", "Upsample"):
        return upsampling_of(graph, node)
    if not node.is_default_domain or node.op_type not in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
        return None
    shape = graph.tensors[node.inputs[0]].shape
    if shape is None or len(shape) != 4 or node.attributes.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET",
                                                                                          "VALID", b"VALID"):
        return None
    if node.op_type == "MaxPool" and len([o for o in node.output_slots or () if o]) > 1:
        return None              # Indices count positions in the whole input
    kernel_shape = node.ints_attribute("kernel_shape")
    if kernel_shape is None and node.op_type.startswith("Conv"):
        weight = graph.tensors[node.inputs[1]].shape
        kernel_shape = None if weight is None else [int(d) for d in weight[2:]]
    if not kernel_shape or len(kernel_shape) != 2:
        return None
    pads = node.ints_attribute("pads") or [0, 0, 0, 0]
    stride, dilation = _h(node.ints_attribute("strides"), 1), _h(node.ints_attribute("dilations"), 1)
    if node.op_type == "ConvTranspose":
        exact = (kernel_shape[0] == stride and dilation == 1 and pads[0] == pads[2] == 0
                 and not node.attributes.get("output_shape") and not any(node.ints_attribute("output_padding") or ()))
        return Window(kernel_shape[0], stride, 1, 0, transposed=True) if exact else None
    if node.op_type == "AveragePool" and (node.int_attribute("ceil_mode", 0)
                                          or (not node.int_attribute("count_include_pad", 0) and (pads[0] or pads[2]))):
        return None              # its divisor would count the padding a patch adds itself
    return Window(kernel_shape[0], stride, dilation, pads[0])


def pad_fill(node: NodeInfo) -> float:
    return LOWEST_FLOAT32 if node.op_type == "MaxPool" else 0.0


@dataclass(frozen=True)
class PatchPlan:
    """Per patch, in order: the rows every tensor of a spatial region holds, the padding
    rows each padded node adds (top, bottom), and the rows each cropped edge reads
    (relative to what its tensor holds; reader ``OUTPUT``: the rows handed out)."""

    rows: Mapping[str, tuple[Rows, ...]]
    pads: Mapping[str, tuple[Rows, ...]]
    crops: Mapping[tuple[str, str], tuple[Rows, ...]]


def _union(a: Rows | None, b: Rows) -> Rows:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def _size(graph: Graph, name: str, axes: Mapping[str, int]) -> int:
    return int(graph.tensors[name].shape[axes[name]])  # type: ignore[index]


def patch_plan(graph: Graph, nodes: Sequence[str], axes: Mapping[str, int], outputs: Sequence[str],
               bounds: Sequence[int]) -> PatchPlan:
    """The rows of every tensor of the region ``nodes`` (in order; ``axes``: the axis each
    tensor carries its rows on) when its ``outputs`` are made ``bounds`` patches at a time."""
    produced = {o for name in nodes for o in graph.nodes[name].outputs}
    held: dict[str, list[Rows]] = {}
    pads: dict[str, list[Rows]] = {}
    reads: dict[tuple[str, str], list[Rows]] = {}
    for start, stop in zip(bounds, bounds[1:], strict=False):
        need: dict[str, Rows] = {o: (start, stop) for o in outputs}
        for name in reversed(nodes):
            node = graph.nodes[name]
            window = window_of(graph, node)
            made = [o for o in node.outputs if o in need]
            if not made:
                raise ValueError(f"node {name!r} makes nothing its patch needs")
            rows: Rows | None = None
            for out in made:
                rows = _union(rows, need[out])
            assert rows is not None
            if window is not None:
                rows = window.computed(rows, _size(graph, node.outputs[0], axes))
            for out in node.outputs:
                if out in axes:
                    held.setdefault(out, []).append(rows)
            for tensor in dict.fromkeys(i for i in node.inputs if i in axes):
                size = _size(graph, tensor, axes)
                read, padding = (rows, (0, 0)) if window is None else window.input_rows(rows, size)
                reads.setdefault((tensor, name), []).append(read)
                need[tensor] = _union(need.get(tensor), read)
                if window is not None:
                    pads.setdefault(name, []).append(padding)
        for tensor, rows in need.items():
            if tensor not in produced:        # a sliced input: the rows it is fed
                held.setdefault(tensor, []).append(rows)
        for out in outputs:
            reads.setdefault((out, OUTPUT), []).append((start, stop))
    crops = {}
    for (tensor, reader), rows in reads.items():
        relative = tuple((a - h[0], b - h[0]) for (a, b), h in zip(rows, held[tensor], strict=True))
        if any(r != (0, h[1] - h[0]) for r, h in zip(relative, held[tensor], strict=True)):
            crops[(tensor, reader)] = relative
    return PatchPlan({t: tuple(r) for t, r in held.items()},
                     {n: tuple(p) for n, p in pads.items() if any(p != (0, 0) for p in p)}, crops)


def max_rows(plan: PatchPlan, tensor: str) -> int:
    return max(b - a for a, b in plan.rows[tensor])


def _share(nbytes: int, rows: int, size: int) -> int:
    return -(-nbytes * rows // size)


def patch_bytes(graph: Graph, plan: PatchPlan, name: str) -> int:
    """``name``'s bytes at its widest patch, halo included."""
    tensor = graph.tensors[name]
    return _share(tensor.nbytes or 0, max_rows(plan, name), int(tensor.shape[ROWS]))  # type: ignore[index]


def staging_bytes(graph: Graph, plan: PatchPlan, copied: Sequence[str]) -> int:
    """What a patch copies besides its interior tensors, counted all at once to be safe:
    the rows of ``copied`` (its sliced inputs and outputs: an NCHW row slice at batch 1 is
    not contiguous), the padded input of its widest padded Conv or pool, and the rows of
    every cropped edge."""
    padded = 0
    for name, pads in plan.pads.items():
        tensor = graph.tensors[graph.nodes[name].inputs[0]]
        rows = max(b - a + top + bottom for (a, b), (top, bottom) in zip(plan.rows[tensor.name], pads, strict=True))
        padded = max(padded, _share(tensor.nbytes or 0, rows, int(tensor.shape[ROWS])))  # type: ignore[index]
    return (sum(patch_bytes(graph, plan, name) for name in copied) + padded
            + sum(patch_bytes(graph, plan, tensor) for tensor, _ in plan.crops))


def patch_workspace(graph: Graph, plan: PatchPlan, name: str, whole: int) -> int:
    """A Conv's or pool's kernel workspace (``whole``: for the whole tensor) for its widest
    patch, as a share of the output rows: exact for MLAS's im2col (output pixels x K); an
    NCHWc copy of the input carries the patch's halo too, a few rows more than this counts."""
    node = graph.nodes[name]
    if window_of(graph, node) is None:
        return whole
    out = graph.tensors[node.outputs[0]]
    return _share(whole, max_rows(plan, out.name), int(out.shape[ROWS]))  # type: ignore[index]
