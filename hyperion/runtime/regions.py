"""Regions: a segment run tile by tile along a free axis (``Segment.region``).

The schedule says everything: which inputs are sliced along which axis, the tile edges,
the axis of every output. The segment's model is built as any segment's, with the tiled
axis of its sliced inputs and of its outputs declared symbolic, so ONE session -- built
once and kept like any other -- runs every tile, widths alike or not. Per tile, each
sliced input is handed over as its slice (a view when contiguous, so uncopied; else a
copy of one tile), the others whole, and each output slice is bound with IOBinding
straight into the whole output array when it is contiguous, else copied in: the
output is never held twice, and the tensors made and used up inside the region only
ever exist one tile at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import numpy as np
import onnxruntime as ort
from onnx import ModelProto

from hyperion.runtime.patches import Staging, patch_model, run_into, run_patches
from hyperion.schedule import Region

# The symbolic length of the tiled axis in a region's model.
TILE_DIM = "hyperion_tile"


def region_model(model: ModelProto, region: Region, node_names: Sequence[str] = ()) -> ModelProto:
    """``model`` (the segment's) with the tiled axis of every sliced input and every output
    symbolic; no declared types inside (they name the whole axis). Spatial patches
    (``region.patches``) rewrite it further: ``node_names`` name its steps' nodes."""
    if region.patches is not None:
        return patch_model(model, region, node_names)
    for value in (*model.graph.input, *model.graph.output):
        axis = region.sliced.get(value.name, region.outputs.get(value.name))
        tensor_type = value.type.tensor_type
        if axis is not None and value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            dim = tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = TILE_DIM
    del model.graph.value_info[:]
    return model


def _along(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(start, stop),)


def run_region(session: ort.InferenceSession, region: Region, feeds: Mapping[str, np.ndarray],
               outputs: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> list[np.ndarray]:
    """The segment's outputs (``outputs``: name -> dtype and whole shape, in order), tile by tile."""
    results = {name: np.empty(shape, dtype) for name, (dtype, shape) in outputs.items()}
    if region.patches is not None:
        run_patches(session, region, feeds, results)
    else:
        _run_tiles(session, region, feeds, results)
    return [results[name] for name in outputs]


def _run_tiles(session: ort.InferenceSession, region: Region, feeds: Mapping[str, np.ndarray],
               results: Mapping[str, np.ndarray]) -> None:
    binding = session.io_binding()
    staging = Staging()
    for start, stop in pairwise(region.bounds):
        for name, value in feeds.items():
            axis = region.sliced.get(name)
            part = value if axis is None else staging.copy_of(name, value[_along(axis, start, stop)])
            binding.bind_cpu_input(name, part)
        run_into(session, binding, results, region.outputs, start, stop, staging)
