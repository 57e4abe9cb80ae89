"""Emit the schedule: the passes' analyses of one plan, as the data the runtime reads.

Everything the runtime will do is decided here and written down -- which
sessions are kept, whether the next one is prefetched, which constants a
segment model recomputes, what type it declares for each boundary tensor, how
the batch is chunked -- so the runtime only reads, and a saved schedule runs
without the graph (see :func:`hyperion.load`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from onnx import TensorProto, TensorShapeProto, TypeProto

from hyperion.errors import PassError
from hyperion.frontend import ImportedModel, is_whole_graph
from hyperion.ir import SMALL_TENSOR_BYTES, ExecutionMode, Graph, NodeInfo, TensorRole
from hyperion.passes import Program
from hyperion.passes.liveness import Liveness
from hyperion.passes.memory.plan_memory import MemoryPlan
from hyperion.passes.segment import Segmentation
from hyperion.passes.tile_patches import pad_fill
from hyperion.passes.tile_regions import Region as TileRegion
from hyperion.schedule import (
    EdgeRecord,
    ModelRef,
    PatchCrop,
    Patches,
    PatchPad,
    Region,
    RowGather,
    Schedule,
    Segment,
    Step,
    Streaming,
    TensorRecord,
    Tiles,
    ValueType,
)

# Axis 0 of every declared tensor type in a streaming schedule: chunks are smaller
# than the batch the types were inferred for (and the last one smaller still).
FREE_BATCH_DIM = "hyperion_batch"


T = TypeVar("T")

def planned(program: Program) -> tuple[Liveness, MemoryPlan, Segmentation]:
    """The planning passes' results, which a schedule is made of."""
    if program.liveness is None or program.memory_plan is None or program.segmentation is None:
        raise PassError("a schedule needs the liveness, plan_memory and segment results; "
                        "run the planning passes first")
    return program.liveness, program.memory_plan, program.segmentation


def _prefetch_note(program: Program) -> str:
    if program.prefetch_dropped:
        return "; prefetch off: the next segment's weights do not fit beside the current segment's"
    return ""


def _streaming(program: Program) -> Streaming | None:
    """How the batch is chunked, for a plan of one chunk (``plan_streaming``); None otherwise."""
    analysis, chunk = program.batch_separability, program.batch_chunk
    if chunk is None or analysis is None:
        return None
    graph = program.graph
    # The program's graph is one chunk's: its batched tensors hold ``chunk`` samples.
    per_sample = sum((graph.tensors[n].nbytes or 0) // chunk
                     for n in graph.inputs + graph.outputs if n in analysis.batched)  # as pinned_bytes counts them
    return Streaming(batch_size=analysis.batch_size, chunk=chunk,
                     batched_inputs=tuple(n for n in graph.inputs if n in analysis.batched),
                     bytes_per_sample=per_sample)


def inlined_constants(graph: Graph, inputs: Iterable[str]) -> tuple[str, ...]:
    """Those of a segment's ``inputs`` that small ``Constant`` nodes produce: its model recomputes them.

    onnxruntime folds a Constant into the graph, so ops whose output shape
    depends on an input's value (Reshape, Unsqueeze, Range, ...) get static
    shapes -- which Scan and Loop bodies reading them from the outer scope need.
    Fed as a graph input instead, the value is unknown when the session is built.
    """
    inlined = []
    for name in inputs:
        tensor = graph.tensors[name]
        node = graph.nodes.get(tensor.producer) if tensor.producer is not None else None
        if (node is not None and node.op_type == "Constant" and node.is_default_domain
                and tensor.nbytes is not None and tensor.nbytes <= SMALL_TENSOR_BYTES):
            inlined.append(name)
    return tuple(inlined)


def _segments(program: Program) -> tuple[tuple[Segment, ...], list[list[str]], list[list[str]]]:
    """The segments, and per step the weights loaded before it and evicted after it."""
    graph = program.graph
    liveness, _, segmentation = planned(program)
    order = liveness.order
    normal = program.mode is ExecutionMode.NORMAL
    cached = set(segmentation.cached)
    # Unpacked plans count every weight at its own size while its segment runs: exactly
    # what a session holds when the weight is fed from a mapping, so the session can
    # persist without holding it (no packing, no copy). Packed plans keep weights in
    # their sessions, packed as onnxruntime does for the whole model.
    feeds_weights = _feeds_weights(program)
    segments: list[Segment] = []
    loads: list[list[str]] = [[] for _ in order]
    evicts: list[list[str]] = [[] for _ in order]
    for index, span in enumerate(segmentation.spans):
        nodes = [graph.nodes[n] for n in order[span.start:span.stop]]
        produced = {t for node in nodes for t in node.outputs}
        read = list(dict.fromkeys(t for node in nodes for t in node.inputs))
        weights = tuple(sorted(t for t in read if graph.is_weight(t)))
        inputs = tuple(t for t in read if t not in produced and not graph.is_weight(t))
        outputs = tuple(t for node in nodes for t in node.outputs
                        if t in graph.outputs or liveness.intervals[t].last >= span.stop)
        constants = inlined_constants(graph, inputs)
        large = tuple(w for w in weights if (graph.tensors[w].nbytes or 0) > SMALL_TENSOR_BYTES)
        # Row gathers and tiled steps read their weights in part themselves: never fed whole.
        runs_in_session = not (program.tiling and program.tiling.isolated_steps(order[span.start:span.stop]))
        fed = large if feeds_weights and index not in cached and runs_in_session else ()
        segments.append(Segment(
            index=index, first_step=span.start, last_step=span.stop - 1, inputs=inputs, outputs=outputs,
            weights=weights, peak_bytes=max(segmentation.step_bytes[span.start:span.stop], default=0),
            model_inputs=tuple(t for t in inputs if t not in constants), inlined_constants=constants,
            cached=index in cached, held_bytes=_at(segmentation.held_bytes, index, 0),
            loading_bytes=_at(segmentation.loading_bytes, index, 0), fed_weights=fed,
            # A session that holds no large weight costs its graph and kernels alone: kept,
            # unless the plan rebuilds it every run (its bookkeeping does not fit: segment rule 9).
            persistent=index in cached or (len(fed) == len(large) and index not in segmentation.rebuilt),
            relaid=bool(fed) and _at(segmentation.relaid, index, False),
            fold_constants=program.memory_limit is None or not generated_weights(graph, nodes),
            region=_region(program, span.start, outputs)))
        if not normal:
            loads[span.start].extend(weights)
            if index not in cached:  # cached sessions keep their weights across runs
                evicts[span.stop - 1].extend(weights)
    if normal and order:
        loads[0].extend(sorted(t.name for t in graph.tensors.values() if t.role is TensorRole.WEIGHT))
    return tuple(segments), loads, evicts


def _region(program: Program, start: int, outputs: tuple[str, ...]) -> Region | None:
    """The region of the tile pass that starts at step ``start``, as the schedule records it."""
    found = [r for r in program.tiling.regions if r.start == start] if program.tiling else []
    if not found:
        return None
    region = found[0]
    return Region(size=region.size, bounds=region.bounds, sliced=dict(region.sliced),
                  outputs={name: region.outputs[name] for name in outputs}, staging_bytes=region.staging_bytes,
                  patches=None if region.patches is None else patches_record(program, region))


def patches_record(program: Program, region: TileRegion) -> Patches:
    """A spatial region's patch plan as the schedule records it: the rows each sliced input
    is fed, the padding each Conv or pool is handed, the rows each cropped edge reads."""
    plan, graph = region.patches, program.graph
    assert plan is not None
    axes = {**region.sliced, **region.outputs, **region.interior}
    pads = []
    for name, rows in sorted(plan.pads.items()):
        node = graph.nodes[name]
        tensor = graph.tensors[node.inputs[0]]
        pads.append(PatchPad(node=name, input=tensor.name, shape=tuple(int(d) for d in tensor.shape or ()),
                             dtype=tensor.dtype or "float32", fill=pad_fill(node), rows=rows))
    crops = tuple(PatchCrop(tensor=tensor, reader=reader, axis=axes[tensor], rows=rows)
                  for (tensor, reader), rows in sorted(plan.crops.items()))
    return Patches(rows={name: plan.rows[name] for name in region.sliced}, pads=tuple(pads), crops=crops)


def _row_gather(program: Program, node: str) -> RowGather | None:
    """The row gather the tile pass made of ``node``, as the schedule records it."""
    gather = program.tiling.row_gathers.get(node) if program.tiling else None
    if gather is None:
        return None
    return RowGather(weight=gather.weight, indices=gather.indices, output=gather.output, rows=gather.rows,
                     row_bytes=gather.row_bytes, read_bytes=gather.read_bytes)


def _optimal_peak(program: Program) -> int | None:
    """The order search's proven smallest peak -- of the steps whole: no bound once the
    tile pass split some."""
    split = program.tiling is not None and bool(program.tiling.row_gathers or program.tiling.tiled
                                                    or program.tiling.regions)
    return program.order_result.optimal_peak_bytes if program.order_result and not split else None


def _tiles(program: Program, node: str) -> Tiles | None:
    """The tiles the tile pass split ``node`` into, as the schedule records them."""
    tiled = program.tiling.tiled.get(node) if program.tiling else None
    if tiled is None:
        return None
    shape = tiled.geometry
    # A fed plan's tiles run on every run: column tiles are read from a tile-major copy.
    fed = _feeds_weights(program) and not tiled.relaid
    return Tiles(weight=shape.weight, bias=shape.bias, output=shape.output, output_axis=shape.output_axis,
                 weight_axis=shape.weight_axis, bounds=tiled.bounds, in_place=shape.in_place,
                 staging_bytes=tiled.staging_bytes, initializers_in_place=shape.initializers_in_place,
                 fed=fed, relaid=tiled.relaid, skip_bytes=shape.skip_bytes,
                 tile_major=fed and shape.weight_axis == 1)


def _feeds_weights(program: Program) -> bool:
    """Whether the plan hands sessions their large weights (memory_opt or streaming, unpacked)."""
    _, _, segmentation = planned(program)
    return program.mode is not ExecutionMode.NORMAL and not segmentation.prepack_weights


def generated_weights(graph: Graph, nodes: list[NodeInfo]) -> list[str]:
    """Large outputs of ``nodes`` computed from constants alone (the weights of models that
    build them with ConstantOfShape, a Transpose of a weight, ...). onnxruntime's constant
    folding would compute them when the session is built and hold them as initializers for
    the session's life; the plan counts them as activations of their step, so a capped
    plan's sessions run them instead."""
    constant = {t for node in nodes for t in node.inputs if graph.is_weight(t)}
    generated = []
    for node in nodes:   # in order: a node fed by generated tensors generates too
        if all(t in constant for t in node.inputs):
            constant.update(node.outputs)
            generated.extend(t for t in node.outputs if (graph.tensors[t].nbytes or 0) > SMALL_TENSOR_BYTES)
    return generated


def _at(values: tuple[T, ...], index: int, default: T) -> T:
    """Segment ``index``'s entry of a per-segment field a segmentation may leave empty."""
    return values[index] if index < len(values) else default


# -- the types segment models declare --------------------------------------------------------
def value_type(type_proto: TypeProto | None) -> ValueType | None:
    """``type_proto`` as a schedule record (None for an empty or unknown type)."""
    kind = None if type_proto is None else type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tensor = getattr(type_proto, kind)
        shape = None if not tensor.HasField("shape") else tuple(_dim(d) for d in tensor.shape.dim)
        return ValueType(kind.removesuffix("_type"), TensorProto.DataType.Name(tensor.elem_type), shape, None)
    if kind in ("sequence_type", "optional_type"):
        element = getattr(type_proto, kind).elem_type
        return ValueType(kind.removesuffix("_type"), None, None, value_type(element))
    if kind == "map_type":
        return ValueType("map", TensorProto.DataType.Name(type_proto.map_type.key_type), None,
                         value_type(type_proto.map_type.value_type))
    return None


def _dim(dim: TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param if dim.HasField("dim_param") else None


def _free_batch(record: ValueType | None) -> ValueType | None:
    if record is None or record.kind != "tensor" or not record.shape:
        return record
    return ValueType(record.kind, record.elem_type, (FREE_BATCH_DIM, *record.shape[1:]), None)


def _boundary_types(segments: Iterable[Segment], value_types: Mapping[str, TypeProto],
                    free_batch: bool) -> dict[str, ValueType]:
    """The declared type of every tensor a segment model takes or returns."""
    types: dict[str, ValueType] = {}
    for segment in segments:
        for name in (*segment.model_inputs, *segment.outputs):
            record = value_type(value_types.get(name))
            record = _free_batch(record) if free_batch else record
            if record is not None:
                types[name] = record
    return types


def _tensors(graph: Graph, value_types: Mapping[str, ValueType], imported: Graph) -> dict[str, TensorRecord]:
    """Every tensor as the plan accounts it; a weight the plan holds in part (a tiled or
    row-gathered weight: ``bytes`` what is held) keeps the model's shape."""
    return {
        name: TensorRecord(
            name=name, dtype=t.dtype, shape=imported.tensors[name].shape if t.role is TensorRole.WEIGHT else t.shape,
            bytes=t.nbytes, role=t.role, producer=t.producer,
            consumers=t.consumers,
            external=t.external,
            value_type=value_types.get(name))
        for name, t in sorted(graph.tensors.items())}


# -- the schedule --------------------------------------------------------------------------------
def _whole_model(imported: ImportedModel, program: Program, segments: tuple[Segment, ...]) -> bool:
    """One normal-mode segment of the whole model: onnxruntime gets the user's model untouched.

    Not for a plan of some outputs only (:func:`hyperion.frontend.restrict_to_outputs`):
    the user's model would compute every branch.

    Not under a cap when the model file itself holds the weights (served in place
    from a lean proto, :func:`hyperion.frontend.embedded.load_lean`): onnxruntime
    given that file would copy every weight while loading it. Nor under a cap when
    import computed weights from constants (:mod:`hyperion.frontend.fold`): the user's
    model would compute them again, and onnxruntime hold both them and their packed copies.
    """
    if program.mode is not ExecutionMode.NORMAL or len(segments) != 1 or not is_whole_graph(imported, program.graph):
        return False
    source = imported.source
    in_model_file = source.path is not None and any(
        t.external is not None and t.external.path == str(source.path) for t in program.graph.tensors.values())
    return not (program.memory_limit is not None and (in_model_file or source.computed_weights))


def build_schedule(imported: ImportedModel, program: Program, *, requested: ExecutionMode,
                   reason: str) -> Schedule:
    graph = program.graph
    liveness, memory_plan, segmentation = planned(program)
    segments, loads, evicts = _segments(program)
    segment_of_step = [0] * len(liveness.order)
    for segment in segments:
        for step in segment.steps:
            segment_of_step[step] = segment.index
    steps = tuple(
        Step(index=i, node=name, op_type=graph.nodes[name].op_type, segment=segment_of_step[i],
             inputs=graph.nodes[name].inputs, outputs=graph.nodes[name].outputs,
             frees=liveness.frees[i], loads=tuple(loads[i]), evicts=tuple(evicts[i]),
             live_bytes=segmentation.step_bytes[i], row_gather=_row_gather(program, name),
             tiles=_tiles(program, name))
        for i, name in enumerate(liveness.order))
    streaming = _streaming(program)
    types = _boundary_types(segments, imported.value_types, free_batch=streaming is not None)
    edges = tuple(sorted((EdgeRecord(e.src, e.dst, e.tensor, e.kind) for e in graph.edges()),
                         key=lambda e: (e.src, e.dst, e.tensor)))
    source = imported.source
    normal = program.mode is ExecutionMode.NORMAL
    return Schedule(
        model=ModelRef(str(source.path) if source.path else None, source.sha256, source.opset),
        mode=program.mode, requested_mode=requested, mode_reason=reason + _prefetch_note(program),
        memory_limit=program.memory_limit, peak_bytes=segmentation.peak_bytes,
        lower_bound_bytes=memory_plan.lower_bound_bytes, arena_bytes=memory_plan.arena_bytes,
        optimal_peak_bytes=_optimal_peak(program),
        input_shapes=dict(imported.input_shapes), tensors=_tensors(graph, types, imported.graph), steps=steps,
        segments=segments, edges=edges, graph_inputs=graph.inputs, graph_outputs=graph.outputs,
        whole_model=_whole_model(imported, program, segments),
        # Memory-saving modes stream weights: every session reads its weights from a file.
        weights_on_disk=not normal,
        prefetch=segmentation.prefetch, cyclic_prefetch=segmentation.cyclic_prefetch,
        prepack_weights=segmentation.prepack_weights,
        # Segments run one after another and sessions are built while others compute:
        # idle workers spinning (onnxruntime's default) would steal the CPU from the
        # next segment, and a session with spinning workers took 28 ms to destroy
        # against 0.1 ms without (2 cores, per-session thread pools).
        intra_op_spinning=normal and len(segments) <= 1,
        pinned_bytes=segmentation.pinned_bytes, streaming=streaming, kept_heap_bytes=segmentation.kept_heap_bytes)
