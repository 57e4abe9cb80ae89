"""Spatial patches: a region run patch by patch along rows, through Convs and pools (``Region.patches``).

The schedule says everything: the output rows of each patch (``Region.bounds``), the rows
each sliced input is fed, the padding rows each Conv or pool is handed above and below
its input, and the rows each reader takes of a tensor that holds more (a halo it does not
need). The segment's model is rewritten once so that ONE session runs every patch: every
padded node reads ``Concat(top, input, bottom)`` along the rows, with ``top`` and
``bottom`` inputs of the model (empty inside the tensor) and its own row padding set to
0; every cropped edge reads ``Gather(tensor, rows)`` along the rows, ``rows`` an input.
Concat and Gather with computed sizes exist since opset 1, so this serves every opset the
corpus holds (Pad and Slice take their amounts as inputs only from opsets 11 and 10).
Each output pixel is computed from the same operands as whole; the session is built
once and kept like any segment's, and every patch feeds it only small tensors besides
its rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, NodeProto, TensorProto, ValueInfoProto, helper

from hyperion.schedule import PatchCrop, Patches, PatchPad, Region

ROWS = 2   # NCHW: the axis padded nodes are padded along (crops carry their own)


def _pad_inputs(pad: PatchPad) -> tuple[str, str]:
    return f"hyperion_pad_top/{pad.node}", f"hyperion_pad_bottom/{pad.node}"


def _crop_input(crop: PatchCrop) -> str:
    return f"hyperion_rows/{crop.tensor}/{crop.reader}"


def _symbolic(value: ValueInfoProto, axis: int, name: str) -> None:
    """The rows of ``value`` (a model input or output) symbolic: every patch has its own."""
    tensor_type = value.type.tensor_type
    if value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
        dim = tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = name


def _rows_unpadded(node: NodeProto) -> None:
    """Set the node's row padding (pads[0], pads[2] of a 2-D window) to 0: its patch input comes padded."""
    for attribute in node.attribute:
        if attribute.name == "pads" and len(attribute.ints) == 4:
            pads = list(attribute.ints)
            pads[0] = pads[2] = 0
            del attribute.ints[:]
            attribute.ints.extend(pads)


def patch_model(model: ModelProto, region: Region, node_names: Sequence[str]) -> ModelProto:
    """``model`` (the segment's; its last ``len(node_names)`` nodes are the schedule's steps,
    named ``node_names``) rewritten to run one patch: see the module docstring."""
    patches = region.patches
    assert patches is not None
    graph = model.graph
    for index, value in enumerate(graph.input):
        if value.name in region.sliced:
            _symbolic(value, region.sliced[value.name], f"hyperion_rows_in{index}")
    for index, value in enumerate(graph.output):
        if value.name in region.outputs:
            _symbolic(value, region.outputs[value.name], f"hyperion_rows_out{index}")
    del graph.value_info[:]
    pads = {pad.node: pad for pad in patches.pads}
    crops = {(crop.tensor, crop.reader): crop for crop in patches.crops}
    # A region output its node makes with more rows than the patch's (a halo read inside):
    # the node writes ``whole``, a Gather hands out the patch's rows under the output's name.
    whole = {crop.tensor: f"{crop.tensor}/hyperion_whole" for crop in patches.crops if not crop.reader}
    handed_out = {made: name for name, made in whole.items()}
    nodes = list(graph.node)
    first_step = len(nodes) - len(node_names)
    rewritten: list[NodeProto] = []
    for position, node in enumerate(nodes):
        name = node_names[position - first_step] if position >= first_step else ""
        for slot, tensor in enumerate(node.input):
            crop = crops.get((tensor, name))
            source = whole.get(tensor, tensor)
            if crop is not None:
                cut = f"{tensor}/hyperion_rows/{name}"
                if cut not in node.input:   # a node reading the tensor twice reads one crop
                    rewritten.append(helper.make_node("Gather", [source, _crop_input(crop)], [cut], axis=crop.axis,
                                                      name=f"hyperion_crop/{tensor}/{name}"))
                source = cut
            node.input[slot] = source
        pad = pads.get(name)
        if pad is not None:
            top, bottom = _pad_inputs(pad)
            padded = f"{pad.input}/hyperion_padded/{name}"
            rewritten.append(helper.make_node("Concat", [top, node.input[0], bottom], [padded], axis=ROWS,
                                              name=f"hyperion_pad/{name}"))
            node.input[0] = padded
            _rows_unpadded(node)
        for slot, tensor in enumerate(node.output):
            node.output[slot] = whole.get(tensor, tensor)
        rewritten.append(node)
        for tensor in node.output:
            original = handed_out.get(tensor)
            if original is not None:   # the output: the patch's rows of what the node made
                crop = crops[(original, "")]
                rewritten.append(helper.make_node("Gather", [tensor, _crop_input(crop)], [original], axis=crop.axis,
                                                  name=f"hyperion_crop/{original}"))
    del graph.node[:]
    graph.node.extend(rewritten)
    for pad in patches.pads:
        dtype = helper.np_dtype_to_tensor_dtype(np.dtype(pad.dtype))
        for name, rows in zip(_pad_inputs(pad), ("hyperion_pad_rows_top", "hyperion_pad_rows_bottom"), strict=True):
            graph.input.append(helper.make_tensor_value_info(name, dtype, [*pad.shape[:ROWS], f"{rows}_{name}",
                                                                           *pad.shape[ROWS + 1:]]))
    for crop in patches.crops:
        graph.input.append(helper.make_tensor_value_info(_crop_input(crop), TensorProto.INT64, [f"n_{crop.tensor}"]))
    return model


class Staging:
    """One flat buffer per tensor that every tile copies through: a slice that is not
    contiguous (rows of NCHW at batch 1) is copied into, or out of, the same pages each
    tile -- a fresh array per tile would be faulted in anew (the plan counts these copies as
    the region's staging, all at once)."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def view(self, name: str, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        """A C-contiguous array of ``shape`` over ``name``'s buffer (grown when too small)."""
        size = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.size < size or flat.dtype != dtype:
            flat = self._flat[name] = np.empty(size, dtype)
        return flat[:size].reshape(shape)

    def copy_of(self, name: str, part: np.ndarray) -> np.ndarray:
        """``part`` itself when contiguous (a view, handed over uncopied), else its copy in the buffer."""
        if part.flags.c_contiguous:
            return part
        buffer = self.view(name, part.dtype, part.shape)
        np.copyto(buffer, part)
        return buffer


def run_into(session: ort.InferenceSession, binding: ort.IOBinding, results: Mapping[str, np.ndarray],
             axes: Mapping[str, int], start: int, stop: int, staging: Staging) -> None:
    """Run one tile of a region (its inputs bound already) into ``results[name][start:stop]``
    along ``axes[name]``: an output slice is bound in place with IOBinding when contiguous,
    else bound to its staging buffer and copied in. The binding is cleared for the next tile."""
    copied = []
    for name, whole in results.items():
        target = whole[_along(axes[name], start, stop)]
        bound = target if target.flags.c_contiguous else staging.view(f"output/{name}", target.dtype, target.shape)
        binding.bind_output(name, "cpu", 0, bound.dtype, list(bound.shape), bound.ctypes.data)
        if bound is not target:
            copied.append((target, bound))
    session.run_with_iobinding(binding)
    for target, bound in copied:
        np.copyto(target, bound)
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()


def _along(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(start, stop),)


def _patch_feeds(patches: Patches, patch: int) -> dict[str, np.ndarray]:
    """The small inputs one patch adds: padding rows (empty inside the tensor) and crop rows."""
    feeds: dict[str, np.ndarray] = {}
    for pad in patches.pads:
        for name, rows in zip(_pad_inputs(pad), pad.rows[patch], strict=True):
            shape = (*pad.shape[:ROWS], rows, *pad.shape[ROWS + 1:])
            feeds[name] = np.full(shape, pad.fill, np.dtype(pad.dtype))
    for crop in patches.crops:
        start, stop = crop.rows[patch]
        feeds[_crop_input(crop)] = np.arange(start, stop, dtype=np.int64)
    return feeds


def run_patches(session: ort.InferenceSession, region: Region, feeds: Mapping[str, np.ndarray],
                results: Mapping[str, np.ndarray]) -> None:
    """The segment's outputs, patch by patch, into ``results`` (name -> whole array)."""
    patches = region.patches
    assert patches is not None
    binding = session.io_binding()
    staging = Staging()
    for patch, (start, stop) in enumerate(zip(region.bounds, region.bounds[1:], strict=False)):
        for name, value in feeds.items():
            axis = region.sliced.get(name)
            if axis is not None:
                first, last = patches.rows[name][patch]
                value = staging.copy_of(name, value[_along(axis, first, last)])  # rows of NCHW: a copy
            binding.bind_cpu_input(name, value)
        for name, value in _patch_feeds(patches, patch).items():
            binding.bind_cpu_input(name, value)
        run_into(session, binding, results, region.outputs, start, stop, staging)
