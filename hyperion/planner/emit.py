"""Emit the schedule: the passes' analyses of one plan, as the data the runtime reads."""

from __future__ import annotations

from typing import Any

from hyperion.frontend import ImportedModel
from hyperion.ir import ExecutionMode, Program, TensorRole
from hyperion.passes.liveness import Liveness
from hyperion.passes.memory.plan_memory import MemoryPlan
from hyperion.passes.segment import Segmentation
from hyperion.planner.streaming import per_sample_bytes
from hyperion.schedule import (
    EdgeRecord,
    ModelRef,
    Schedule,
    Segment,
    Step,
    TensorRecord,
)


def _prefetch_note(program: Program) -> str:
    if program.notes.get("prefetch_dropped"):
        return "; prefetch off: the next segment's weights do not fit beside the current segment's"
    return ""


def _plan_extra(program: Program) -> dict[str, Any]:
    """What the runtime reads besides the steps: prefetch, the weight cache, streaming."""
    segmentation: Segmentation = program.segmentation
    extra: dict[str, Any] = {
        "prefetch": segmentation.prefetch, "cyclic_prefetch": segmentation.cyclic_prefetch,
        "cached_segments": list(segmentation.cached), "session_held_bytes": list(segmentation.held_bytes),
        "session_loading_bytes": list(segmentation.loading_bytes), "pinned_bytes": segmentation.pinned_bytes}
    analysis = program.notes.get("batch_separability")
    if "batch_chunk" in program.notes and analysis is not None:
        graph = program.graph
        extra["batch_size"] = analysis.batch_size
        extra["batched_inputs"] = [n for n in graph.inputs if n in analysis.batched]
        extra["bytes_per_sample"] = per_sample_bytes(graph, analysis, graph.inputs + graph.outputs)
    return extra


def build_schedule(imported: ImportedModel, program: Program, *, requested: ExecutionMode,
                   reason: str) -> Schedule:
    graph = program.graph
    liveness: Liveness = program.liveness
    memory_plan: MemoryPlan = program.memory_plan
    segmentation: Segmentation = program.segmentation
    order = liveness.order
    normal = program.mode is ExecutionMode.NORMAL
    segment_of_step = [0] * len(order)
    for index, span in enumerate(segmentation.spans):
        for step in range(span.start, span.stop):
            segment_of_step[step] = index

    segments: list[Segment] = []
    loads: list[list[str]] = [[] for _ in order]
    evicts: list[list[str]] = [[] for _ in order]
    for index, span in enumerate(segmentation.spans):
        nodes = [graph.nodes[n] for n in order[span.start:span.stop]]
        produced = {t for node in nodes for t in node.outputs}
        read = list(dict.fromkeys(t for node in nodes for t in node.inputs))
        weights = sorted(t for t in read if graph.is_weight(t))
        inputs = [t for t in read if t not in produced and not graph.is_weight(t)]
        outputs = [t for node in nodes for t in node.outputs
                   if t in graph.outputs or liveness.intervals[t].last >= span.stop]
        segments.append(Segment(index, span.start, span.stop - 1, tuple(inputs), tuple(outputs),
                                tuple(weights),
                                max(segmentation.step_bytes[span.start:span.stop], default=0)))
        if not normal:
            loads[span.start].extend(weights)
            if index not in segmentation.cached:  # cached sessions keep their weights across runs
                evicts[span.stop - 1].extend(weights)
    if normal and order:
        loads[0].extend(sorted(t.name for t in graph.tensors.values() if t.role is TensorRole.WEIGHT))

    steps = tuple(
        Step(index=i, node=name, op_type=graph.nodes[name].op_type, segment=segment_of_step[i],
             inputs=graph.nodes[name].inputs, outputs=graph.nodes[name].outputs,
             frees=liveness.frees[i], loads=tuple(loads[i]), evicts=tuple(evicts[i]),
             live_bytes=segmentation.step_bytes[i])
        for i, name in enumerate(order))
    tensors = {
        name: TensorRecord(
            name=name, dtype=t.dtype, shape=t.shape, bytes=t.nbytes, role=t.role.value,
            producer=t.producer, consumers=t.consumers,
            external=None if t.external is None else {"path": t.external.path, "offset": t.external.offset,
                                                      "length": t.external.length})
        for name, t in sorted(graph.tensors.items())}
    edges = tuple(sorted((EdgeRecord(e.src, e.dst, e.tensor, e.kind.value) for e in graph.edges()),
                         key=lambda e: (e.src, e.dst, e.tensor)))
    source = imported.source
    return Schedule(
        model=ModelRef(str(source.path) if source.path else None, source.sha256, source.opset),
        mode=program.mode.value, memory_limit=program.memory_limit,
        peak_bytes=segmentation.peak_bytes, lower_bound_bytes=memory_plan.lower_bound_bytes,
        arena_bytes=memory_plan.arena_bytes, input_shapes=dict(imported.input_shapes), tensors=tensors,
        steps=steps, segments=tuple(segments), edges=edges, graph_inputs=graph.inputs,
        graph_outputs=graph.outputs, requested_mode=requested.value, mode_reason=reason + _prefetch_note(program),
        batch_chunk=program.notes.get("batch_chunk"), extra=_plan_extra(program),
        optimal_peak_bytes=getattr(program.order_result, "optimal_peak_bytes", None))
