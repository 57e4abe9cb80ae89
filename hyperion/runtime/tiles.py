"""Tiled steps: one op computed tile by tile, each from one weight tile, into one output.

The schedule says everything (``Step.tiles``): the axis, the tile edges, which axis
of the weight a tile slices, whether output slices are contiguous. Per tile, the
weight tile is read from the weight's file into one buffer every tile reuses
(positioned reads: one for a contiguous tile, one per weight row for a column
tile), and a one-node session over the step's own node computes it. The weight tile
(and bias tile) are handed to that session as initializers over that buffer
(``SessionOptions.add_initializer``: onnxruntime uses the caller's memory in place),
so onnxruntime pre-packs them exactly as it packs the whole weight and each output
element is computed as untiled, and holds no copy of its own: measured on a 13.7 MiB
tile, the session held the packed copy alone, where ``add_external_initializers``
copied the tile first (one more tile while packing, and for good when unpacked). The
tile model declares those initializers as references into the weights' own files,
which onnxruntime checks but never reads (the initializers handed over replace them).
The tile's output is bound straight into the output buffer with IOBinding when its
slice is contiguous, else copied into it; the output is never held twice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import NodeProto, TensorProto

from hyperion.errors import ModelLoadError, RuntimeExecutionError
from hyperion.schedule import Tiles

# Where a tile initializer of a weight without a file of its own is said to be: never read
# (its bytes are handed over with ``add_external_initializers``, which copies them).
IN_MEMORY_LOCATION = "hyperion-tile-in-memory"

Location = tuple[str, int]   # a weight's file (relative to the session's external-data folder), offset


def tile_model(node: NodeProto, tiles: Tiles, width: int, weight_shape: tuple[int, ...],
               inputs: Mapping[str, np.ndarray], initializers: Mapping[str, TensorProto], opsets: list,
               locations: Mapping[str, Location]) -> bytes:
    """A one-node model of ``node`` for one tile ``width`` wide: activations as inputs, the
    weight (and bias) tile as initializers the session is handed when it is created -- or,
    for ``tiles.fed``, as inputs too, so that one session serves every tile of that width."""
    tile_shape = list(weight_shape)
    tile_shape[tiles.weight_axis] = width
    sliced = {tiles.weight: tile_shape}
    if tiles.bias is not None and tiles.bias not in inputs:  # a weight: supplied like the weight tile
        sliced[tiles.bias] = [width]
    declared = [] if tiles.fed else [_reference(name, shape, locations.get(name)) for name, shape in sliced.items()]
    fed = [onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
           for name, shape in sliced.items()] if tiles.fed else []
    others = [initializers[name] for name in node.input if name and name in initializers
              and name not in (tiles.weight, tiles.bias)]
    graph = onnx.helper.make_graph(
        [node], "tile", [*(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                                              list(value.shape)) for name, value in inputs.items()),
                         *fed],
        [onnx.ValueInfoProto(name=tiles.output)], [*declared, *others])
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    return model.SerializeToString()


TILE_FILE = "tile.bin"


def tile_in_file(model: onnx.ModelProto, tiles: Mapping[str, np.ndarray], folder: Path) -> onnx.ModelProto:
    """``model`` with the initializers ``tiles`` names declared in one file of ``folder``
    holding exactly those arrays (written there now)."""
    offsets = {}
    with (folder / TILE_FILE).open("wb") as handle:
        for name, value in tiles.items():
            offsets[name] = handle.tell()
            handle.write(np.ascontiguousarray(value, np.float32).data)
    built = onnx.ModelProto()
    built.CopyFrom(model)
    for tensor in built.graph.initializer:
        if tensor.name in offsets:
            tensor.CopyFrom(_reference(tensor.name, list(tensor.dims), (TILE_FILE, offsets[tensor.name])))
    return built


def _reference(name: str, shape: list[int], location: Location | None) -> TensorProto:
    """An external-data initializer declaration: into the weight's own file (within its
    bytes), or, for a weight without one, a location never read."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
    where = [("location", IN_MEMORY_LOCATION)] if location is None else [
        ("location", location[0]), ("offset", str(location[1]))]
    for key, value in (*where, ("length", str(4 * math.prod(shape)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def read_weight_tile(path: Path, offset: int, name: str, shape: tuple[int, ...], axis: int, start: int,
                     stop: int, buffer: np.ndarray) -> np.ndarray:
    """``weight[start:stop]`` along ``axis`` (0, or 1 of a 2-D weight) into ``buffer``, as a
    C-contiguous array; read from the file with one positioned read per contiguous run."""
    width = stop - start
    tile_shape = list(shape)
    tile_shape[axis] = width
    tile = buffer[:math.prod(tile_shape)].reshape(tile_shape)
    raw = memoryview(tile.reshape(-1).view(np.uint8))
    item = tile.itemsize
    if axis == 0:
        row_bytes = math.prod(shape[1:]) * item
        runs = [(offset + start * row_bytes, 0, width * row_bytes)]
    else:  # a column block of a row-major [rows, columns] weight: one run per row
        rows, columns = shape
        runs = [(offset + (row * columns + start) * item, row * width * item, width * item) for row in range(rows)]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read weight {name!r}: {exc.strerror or exc}") from None
    try:
        for file_offset, at, length in runs:
            if os.preadv(fd, [raw[at:at + length]], file_offset) != length:
                raise ModelLoadError(f"{path}: truncated external data for weight {name!r}")
    finally:
        os.close(fd)
    return tile


# A relaid tile's session, built once from the tile (its weight and bias tiles, read when
# asked for) and kept; and what to do once the tile has run (drop its mapped pages).
RelaidTile = Callable[[int, int, Mapping[str, np.ndarray], Callable[[], dict[str, np.ndarray]]],
                      tuple[ort.InferenceSession, Callable[[], None]]]


def run_tiles(tiles: Tiles, node: str, output_shape: tuple[int, ...], inputs: Mapping[str, np.ndarray],
              read_tile: Callable[[int, int, np.ndarray], np.ndarray], bias: np.ndarray | None,
              build: Callable[[int, Mapping[str, np.ndarray]], bytes],
              options: Callable[[], ort.SessionOptions], in_place_initializers: bool,
              kept: Callable[[int, Mapping[str, np.ndarray]], ort.InferenceSession] | None = None,
              relaid: RelaidTile | None = None) -> np.ndarray:
    """The step's output, tile by tile: ``read_tile(start, stop, buffer)`` gives a weight
    tile, ``build(width, inputs)`` the tile model, ``options()`` fresh session options.
    ``bias`` is a bias weight's values; a bias that is an activation is among ``inputs``.
    ``in_place_initializers``: the tile model declares the weights in their own files, so
    sessions use the tiles in place (else they are handed over as copies). ``kept(width,
    inputs)``, for ``tiles.fed``: the session built once for tiles of that width, handed each
    tile as an input. ``relaid(start, stop, inputs, supplied)``, for ``tiles.relaid``: the
    tile's own session, which reads its weight tile (``supplied()``) only when first built."""
    output = np.empty(output_shape, np.float32)
    staging: list[np.ndarray] = []   # allocated when a tile is first read: relaid tiles read none later

    def supplied_of(start: int, stop: int) -> dict[str, np.ndarray]:
        # A relaid tile reads its weight once, to be written out: a buffer of its own, let go
        # before its session loads the packed file (the plan counts the two one after the other).
        if tiles.relaid:
            buffer = np.empty(max(1, tiles.staging_bytes // 4), np.float32)
        else:
            if not staging:
                staging.append(np.empty(max(1, tiles.staging_bytes // 4), np.float32))
            buffer = staging[0]
        supplied = {tiles.weight: read_tile(start, stop, buffer)}
        if tiles.bias is not None and tiles.bias not in inputs and bias is not None:
            supplied[tiles.bias] = np.ascontiguousarray(bias[start:stop])
        return supplied

    for start, stop in zip(tiles.bounds, tiles.bounds[1:], strict=False):
        tile_inputs = dict(inputs)
        if tiles.bias is not None and tiles.bias in inputs:
            tile_inputs[tiles.bias] = np.ascontiguousarray(inputs[tiles.bias][start:stop])
        if relaid is not None:
            session, ran = relaid(start, stop, tile_inputs, lambda start=start, stop=stop: supplied_of(start, stop))
            try:
                _run_tile(session, tiles, node, start, stop, tile_inputs, output)
            finally:
                ran()
            continue
        supplied = supplied_of(start, stop)
        weight = supplied[tiles.weight]
        if kept is not None:
            _run_tile(kept(stop - start, tile_inputs), tiles, node, start, stop, {**tile_inputs, **supplied}, output)
            continue
        session_options = options()
        values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in supplied.items()}
        if in_place_initializers:   # the caller's memory, used in place: kept alive with the session
            for name, value in values.items():
                session_options.add_initializer(name, value)
        else:
            session_options.add_external_initializers(list(values), list(values.values()))
        try:
            session = ort.InferenceSession(build(stop - start, tile_inputs), session_options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeExecutionError(f"node {node!r}: onnxruntime cannot build the session of tile {start}:{stop} "
                                        f"of {tiles.output!r}: {str(exc).strip().splitlines()[0]}") from None
        _run_tile(session, tiles, node, start, stop, tile_inputs, output)
        del session, session_options, values, supplied, weight, tile_inputs
    return output


def _run_tile(session: ort.InferenceSession, tiles: Tiles, node: str, start: int, stop: int,
              feeds: Mapping[str, np.ndarray], output: np.ndarray) -> None:
    """One tile into its slice of ``output``: bound in place when the slice is contiguous."""
    target = output[(slice(None),) * tiles.output_axis + (slice(start, stop),)]
    try:
        if tiles.in_place and target.flags.c_contiguous:
            binding = session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output(tiles.output, "cpu", 0, np.float32, list(target.shape), target.ctypes.data)
            session.run_with_iobinding(binding)
        else:
            target[...] = session.run([tiles.output], dict(feeds))[0]
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise RuntimeExecutionError(f"node {node!r}: onnxruntime failed on tile {start}:{stop} of "
                                    f"{tiles.output!r}: {str(exc).strip().splitlines()[0]}") from None
