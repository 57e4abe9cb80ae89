"""From an imported model and options to a :class:`~hyperion.schedule.Schedule`.

Runs the pass pipeline in the requested mode and, for ``adaptive``, picks the
fastest mode whose plan fits the cap, recording the choice and the reason.
"""

from __future__ import annotations

import logging

from hyperion.errors import MemoryLimitError, OptionError, ShapeError
from hyperion.ir import ExecutionMode, Program, TensorRole
from hyperion.onnx_import import ImportedModel
from hyperion.passes import PassManager, default_passes
from hyperion.passes.liveness import Liveness
from hyperion.passes.plan_memory import MemoryPlan
from hyperion.passes.segment import Segmentation
from hyperion.schedule import EdgeRecord, ModelRef, Schedule, Segment, Step, TensorRecord
from hyperion.units import format_size

log = logging.getLogger(__name__)


def parse_mode(mode: str | ExecutionMode) -> ExecutionMode:
    try:
        return ExecutionMode(mode)
    except ValueError:
        raise OptionError(f"mode: unknown mode {mode!r}; choose one of "
                          f"{', '.join(m.value for m in ExecutionMode)}") from None


def run_passes(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
               max_segment_steps: int | None = None) -> Program:
    program = Program(imported.graph, mode=mode, memory_limit=memory_limit)
    PassManager(default_passes(max_segment_steps=max_segment_steps))(program)
    return program


def plan(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
         max_segment_steps: int | None = None) -> Schedule:
    """The schedule of ``imported`` in ``mode`` under ``memory_limit`` bytes."""
    if memory_limit is not None:
        unsized = [t.name for t in imported.graph.tensors.values()
                   if t.nbytes is None and (t.consumers or t.producer)]
        if unsized:
            raise ShapeError(f"{imported.source.label}: the size of tensor {unsized[0]!r} is unknown "
                             "before running, so a memory cap cannot be promised; bind the input shapes "
                             "(input_shapes=...) or compile without a cap")
    if mode is ExecutionMode.STREAMING:
        raise OptionError("mode: 'streaming' needs a batch split plan; use mode='adaptive' or 'memory_opt'")
    if mode is not ExecutionMode.ADAPTIVE:
        program = run_passes(imported, mode, memory_limit, max_segment_steps)
        return build_schedule(imported, program, requested=mode, reason=f"{mode.value} mode was requested")
    if memory_limit is None:
        program = run_passes(imported, ExecutionMode.NORMAL, None, max_segment_steps)
        return build_schedule(imported, program, requested=mode,
                              reason="no memory limit: normal mode, every weight resident")
    try:
        program = run_passes(imported, ExecutionMode.NORMAL, memory_limit, max_segment_steps)
        reason = (f"normal mode fits: peak {format_size(program.segmentation.peak_bytes)} <= limit "
                  f"{format_size(memory_limit)}")
    except MemoryLimitError as normal_error:
        program = run_passes(imported, ExecutionMode.MEMORY_OPT, memory_limit, max_segment_steps)
        reason = (f"normal mode needs at least {format_size(normal_error.smallest_limit_bytes)} > limit "
                  f"{format_size(memory_limit)}; memory_opt fits with peak "
                  f"{format_size(program.segmentation.peak_bytes)}")
    return build_schedule(imported, program, requested=mode, reason=reason)


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
        graph_outputs=graph.outputs, requested_mode=requested.value, mode_reason=reason)
