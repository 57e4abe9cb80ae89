"""Tiled steps: one op computed tile by tile, each from one weight tile, into one output.

The schedule says everything (``Step.tiles``): the axis, the tile edges, which axis
of the weight a tile slices, whether output slices are contiguous. Per tile, the
weight tile is read into one buffer every tile reuses (:mod:`hyperion.runtime.tile_reads`),
and a one-node session over the step's own node computes it. In a fed plan
(``Tiles.fed``) that session is built once per tile width and kept, the tile one of its
inputs, bound once per width with the activations. Otherwise the weight tile
(and bias tile) are handed to a session of the tile's own as initializers over that buffer
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
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import NodeProto, TensorProto

from hyperion.errors import RuntimeExecutionError
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


# A relaid tile's session, built once from the tile (its weight and bias tiles, read when
# asked for) and kept; and what to do once the tile has run (drop its mapped pages).
RelaidTile = Callable[[int, int, Mapping[str, np.ndarray], Callable[[], dict[str, np.ndarray]]],
                      tuple[ort.InferenceSession, Callable[[], None]]]


class Staging:
    """The one buffer of ``Tiles.staging_bytes`` the tiles of a run reuse, laid out as the plan
    counts it: the widest weight tile, the bytes a column tile skips (``skip_bytes``), and the
    widest output tile when output slices are not contiguous."""

    def __init__(self, tiles: Tiles, weight_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> None:
        widest = max(b - a for a, b in zip(tiles.bounds, tiles.bounds[1:], strict=False))
        per_index = math.prod(weight_shape) // weight_shape[tiles.weight_axis]
        self.buffer = np.empty(max(1, tiles.staging_bytes // 4), np.float32)
        self.weight = self.buffer[:per_index * widest]
        skip_end = self.weight.size + tiles.skip_bytes // 4
        self.skip = self.buffer[self.weight.size:skip_end].view(np.uint8) if tiles.skip_bytes else None
        self.output = self.buffer[skip_end:]
        self.output_shape = output_shape
        self.output_axis = tiles.output_axis

    def output_tile(self, width: int) -> np.ndarray:
        """A buffer for one output tile ``width`` wide (its slice of the output is not contiguous)."""
        shape = list(self.output_shape)
        shape[self.output_axis] = width
        return self.output[:math.prod(shape)].reshape(shape)


# A weight tile [start, stop) into a buffer, given a buffer for the bytes it skips (or None).
ReadTile = Callable[[int, int, np.ndarray, "np.ndarray | None"], np.ndarray]


def run_tiles(tiles: Tiles, node: str, output_shape: tuple[int, ...], weight_shape: tuple[int, ...],
              inputs: Mapping[str, np.ndarray], read_tile: ReadTile, bias: np.ndarray | None,
              build: Callable[[int, Mapping[str, np.ndarray]], bytes],
              options: Callable[[], ort.SessionOptions], in_place_initializers: bool,
              kept: Callable[[int, Mapping[str, np.ndarray]], ort.InferenceSession] | None = None,
              relaid: RelaidTile | None = None) -> np.ndarray:
    """The step's output, tile by tile: ``read_tile(start, stop, buffer, skip)`` gives a weight
    tile, ``build(width, inputs)`` the tile model, ``options()`` fresh session options.
    ``bias`` is a bias weight's values; a bias that is an activation is among ``inputs``.
    ``in_place_initializers``: the tile model declares the weights in their own files, so
    sessions use the tiles in place (else they are handed over as copies). ``kept(width,
    inputs)``, for ``tiles.fed``: the session built once for tiles of that width, handed each
    tile as an input. ``relaid(start, stop, inputs, supplied)``, for ``tiles.relaid``: the
    tile's own session, which reads its weight tile (``supplied()``) only when first built."""
    output = np.empty(output_shape, np.float32)
    if kept is not None:
        staging = Staging(tiles, weight_shape, output_shape)
        _run_fed_tiles(tiles, node, inputs, read_tile, bias, kept, staging, output)
        return output
    shared: list[Staging] = []   # allocated when a tile is first read: relaid tiles read none later

    def supplied_of(start: int, stop: int) -> dict[str, np.ndarray]:
        # A relaid tile reads its weight once, to be written out: a buffer of its own, let go
        # before its session loads the packed file (the plan counts the two one after the other).
        if tiles.relaid or not shared:
            staging = Staging(tiles, weight_shape, output_shape)
            if not tiles.relaid:
                shared.append(staging)
        else:
            staging = shared[0]
        supplied = {tiles.weight: read_tile(start, stop, staging.weight, staging.skip)}
        if tiles.bias is not None and tiles.bias not in inputs and bias is not None:
            supplied[tiles.bias] = np.ascontiguousarray(bias[start:stop])
        return supplied

    for start, stop in zip(tiles.bounds, tiles.bounds[1:], strict=False):
        tile_inputs = _tile_inputs(tiles, inputs, start, stop)
        if relaid is not None:
            session, ran = relaid(start, stop, tile_inputs, lambda start=start, stop=stop: supplied_of(start, stop))
            try:
                _run_tile(session, tiles, node, start, stop, tile_inputs, output)
            finally:
                ran()
            continue
        supplied = supplied_of(start, stop)
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
        del session, session_options, values, supplied, tile_inputs
    return output


def _tile_inputs(tiles: Tiles, inputs: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """The step's activations as a tile reads them: a bias that is an activation, sliced."""
    if tiles.bias is None or tiles.bias not in inputs:
        return dict(inputs)
    return {**inputs, tiles.bias: np.ascontiguousarray(inputs[tiles.bias][start:stop])}


def _run_fed_tiles(tiles: Tiles, node: str, inputs: Mapping[str, np.ndarray], read_tile: ReadTile,
                   bias: np.ndarray | None, kept: Callable[[int, Mapping[str, np.ndarray]], ort.InferenceSession],
                   staging: Staging, output: np.ndarray) -> None:
    """Fed tiles: each read into ``staging`` and run by the session kept for its width. Tiles
    written in place are run bound: the activations and the weight tile's buffer (the same
    for every tile of a width) once per width, the output slice (and a bias tile) per tile
    -- a run of a bound session costs 3 us, against 10 us binding everything again. Other
    tiles are run with their feeds (6 us) and copied into their slice of the output."""
    sliced_bias = tiles.bias is not None and (tiles.bias in inputs or bias is not None)
    whole_bias = None if not sliced_bias else np.ascontiguousarray(inputs[tiles.bias] if tiles.bias in inputs
                                                                    else bias)
    activations = {name: value for name, value in inputs.items() if name != tiles.bias}
    sessions: dict[int, ort.InferenceSession] = {}
    bindings: dict[int, ort.IOBinding] = {}
    for start, stop in zip(tiles.bounds, tiles.bounds[1:], strict=False):
        width = stop - start
        if width not in sessions:
            sessions[width] = kept(width, _tile_inputs(tiles, inputs, start, stop))
        session = sessions[width]
        weight = read_tile(start, stop, staging.weight, staging.skip)
        target = output[(slice(None),) * tiles.output_axis + (slice(start, stop),)]
        feeds = {**activations, tiles.weight: weight}
        if whole_bias is not None:
            feeds[tiles.bias] = whole_bias[start:stop]   # type: ignore[index]
        try:
            if not (tiles.in_place and target.flags.c_contiguous):
                target[...] = session.run([tiles.output], feeds)[0]
                continue
            binding = bindings.get(width)
            if binding is None:
                bindings[width] = binding = session.io_binding()
                for name, value in feeds.items():
                    binding.bind_cpu_input(name, value)   # C-contiguous: used in place, not copied
            elif whole_bias is not None:
                binding.bind_cpu_input(tiles.bias, feeds[tiles.bias])   # type: ignore[index]
            _bind_output(binding, tiles.output, target)
            session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeExecutionError(f"node {node!r}: onnxruntime failed on tile {start}:{stop} of "
                                        f"{tiles.output!r}: {str(exc).strip().splitlines()[0]}") from None


def _bind_output(binding: ort.IOBinding, name: str, into: np.ndarray) -> None:
    """Output ``name`` written straight into ``into`` (C-contiguous) when the session runs."""
    binding.bind_output(name, "cpu", 0, into.dtype, list(into.shape), into.ctypes.data)


def _run_tile(session: ort.InferenceSession, tiles: Tiles, node: str, start: int, stop: int,
              feeds: Mapping[str, np.ndarray], output: np.ndarray) -> None:
    """One tile into its slice of ``output``: bound in place when the slice is contiguous."""
    target = output[(slice(None),) * tiles.output_axis + (slice(start, stop),)]
    try:
        if tiles.in_place and target.flags.c_contiguous:
            binding = session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            _bind_output(binding, tiles.output, target)
            session.run_with_iobinding(binding)
        else:
            target[...] = session.run([tiles.output], dict(feeds))[0]
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise RuntimeExecutionError(f"node {node!r}: onnxruntime failed on tile {start}:{stop} of "
                                    f"{tiles.output!r}: {str(exc).strip().splitlines()[0]}") from None
