"""From an imported model and options to a :class:`~hyperion.schedule.Schedule`.

Runs the pass pipeline in the requested mode and, for ``adaptive``, picks the
fastest mode whose plan fits the cap -- normal if everything fits, else
memory_opt, else memory_opt over chunks of the batch (streaming) -- recording
the choice and the reason. :func:`optimal_batch_size` reads the largest batch
that fits a cap off the plan.
"""

from __future__ import annotations

import logging

import dataclasses
from typing import Any

from hyperion.planner.streaming import (SegmentOptions, batch_analysis, chunk_program, largest_batch, per_sample_bytes,
                               smallest_limit, stream_pinned_bytes)
from hyperion.errors import MemoryLimitError, OptionError, ShapeError, UnsupportedModelError
from hyperion.ir import ExecutionMode, Program, TensorRole
from hyperion.frontend import ImportedModel
from hyperion.passes import PassManager, default_passes
from hyperion.passes.batch.separable import refusal_message
from hyperion.passes.liveness import Liveness
from hyperion.passes.memory.plan_memory import MemoryPlan
from hyperion.passes.segment import SegmentPass, Segmentation
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
               max_segment_steps: int | None = None, options: SegmentOptions | None = None) -> Program:
    options = options or SegmentOptions(max_segment_steps)
    try:
        return _run(imported, mode, memory_limit, options)
    except MemoryLimitError:
        if mode is ExecutionMode.NORMAL or not options.prefetch:
            raise
    # The double buffer does not fit: each segment's weights are loaded when it starts.
    program = _run(imported, mode, memory_limit, dataclasses.replace(options, prefetch=False))
    program.notes["prefetch_dropped"] = True
    return program


def _run(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
         options: SegmentOptions) -> Program:
    program = Program(imported.graph, mode=mode, memory_limit=memory_limit)
    passes = [options.segment_pass() if isinstance(p, SegmentPass) else p
              for p in default_passes(max_segment_steps=options.max_segment_steps)]
    PassManager(passes)(program)
    return program


def plan(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
         max_segment_steps: int | None = None, *, prefetch: bool = True,
         weight_cache_bytes: int | None = None, prepack_weights: bool = True) -> Schedule:
    """The schedule of ``imported`` in ``mode`` under ``memory_limit`` bytes.

    ``prefetch``: in memory_opt, create the next segment's session while the
    current one computes (accounted: both are resident then).
    ``weight_cache_bytes``: the most bytes of sessions kept alive across runs
    in memory_opt (``None``: as many as the cap allows; 0: none).
    ``prepack_weights=False``: sessions will not pre-pack weights, so each holds
    its weights at their own size (recorded in the schedule: the runtime must
    then run unpacked).
    """
    options = SegmentOptions(max_segment_steps, prefetch, weight_cache_bytes, prepack_weights)
    schedule = _plan(imported, mode, memory_limit, options)
    if prepack_weights:
        return schedule
    return dataclasses.replace(schedule, extra={**schedule.extra, "prepack_weights": False})


def _plan(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
          options: SegmentOptions) -> Schedule:
    if memory_limit is not None:
        unsized = [t.name for t in imported.graph.tensors.values()
                   if t.nbytes is None and (t.consumers or t.producer)]
        if unsized:
            raise ShapeError(f"{imported.source.label}: the size of tensor {unsized[0]!r} is unknown "
                             "before running, so a memory cap cannot be promised; bind the input shapes "
                             "(input_shapes=...) or compile without a cap")
    if mode is ExecutionMode.STREAMING:
        program = plan_streaming(imported, memory_limit, options)
        return build_schedule(imported, program, requested=mode, reason=f"streaming mode was requested; "
                              f"{_chunk_phrase(program)}")
    if mode is not ExecutionMode.ADAPTIVE:
        program = run_passes(imported, mode, memory_limit, options=options)
        return build_schedule(imported, program, requested=mode, reason=f"{mode.value} mode was requested")
    if memory_limit is None:
        program = run_passes(imported, ExecutionMode.NORMAL, None, options=options)
        return build_schedule(imported, program, requested=mode,
                              reason="no memory limit: normal mode, every weight resident")
    program, reason = _adaptive(imported, memory_limit, options)
    return build_schedule(imported, program, requested=mode, reason=reason)


def _adaptive(imported: ImportedModel, memory_limit: int, options: SegmentOptions) -> tuple[Program, str]:
    """The fastest mode whose plan fits: normal, else memory_opt, else streaming."""
    limit = format_size(memory_limit)
    try:
        program = run_passes(imported, ExecutionMode.NORMAL, memory_limit, options=options)
        return program, f"normal mode fits: peak {format_size(program.segmentation.peak_bytes)} <= limit {limit}"
    except MemoryLimitError as normal_error:
        normal_needs = f"normal mode needs at least {format_size(normal_error.smallest_limit_bytes)} > limit {limit}"
        normal_smallest = normal_error.smallest_limit_bytes
    try:
        program = run_passes(imported, ExecutionMode.MEMORY_OPT, memory_limit, options=options)
        return program, (f"{normal_needs}; memory_opt fits with peak "
                         f"{format_size(program.segmentation.peak_bytes)}")
    except MemoryLimitError as error:
        memory_opt_error = error
    try:
        program = plan_streaming(imported, memory_limit, options)
    except (MemoryLimitError, UnsupportedModelError) as streaming_error:
        # The smallest cap adaptive can meet: the smaller of normal's and memory_opt's, both
        # planned under a cap (memory_opt's can exceed normal's: it accounts a prefetched
        # segment). Streaming's figure is read off an uncapped plan, so it is no promise.
        smallest = min(normal_smallest, memory_opt_error.smallest_limit_bytes)
        raise MemoryLimitError(
            f"{memory_opt_error}; streaming cannot help: {streaming_error}; the smallest limit that works in "
            f"adaptive mode is {smallest} bytes ({format_size(smallest)})", node=memory_opt_error.node,
            needed_bytes=memory_opt_error.needed_bytes, smallest_limit_bytes=smallest) from None
    return program, (f"{normal_needs}; memory_opt needs at least "
                     f"{format_size(memory_opt_error.smallest_limit_bytes)} for the whole batch; "
                     f"{_chunk_phrase(program)}")


def _chunk_phrase(program: Program) -> str:
    analysis = program.notes["batch_separability"]
    return (f"the batch of {analysis.batch_size} runs in chunks of {program.notes['batch_chunk']} with peak "
            f"{format_size(program.segmentation.peak_bytes)}")


def plan_streaming(imported: ImportedModel, memory_limit: int | None, options: SegmentOptions) -> Program:
    """The plan of the largest chunk of the batch that fits, in memory_opt mode."""
    whole = run_passes(imported, ExecutionMode.MEMORY_OPT, None, options=options)
    analysis = batch_analysis(imported, whole.order)
    if not analysis.separable:
        raise UnsupportedModelError(f"{imported.source.label}: mode 'streaming': {refusal_message(analysis)}")
    pinned = stream_pinned_bytes(imported.graph, analysis)
    chunk = analysis.batch_size
    if memory_limit is not None:
        chunk = largest_batch(whole, analysis, memory_limit, analysis.batch_size, prefetch=options.prefetch,
                              fixed_bytes=pinned, prepack_weights=options.prepack_weights)
        if chunk < 1 and options.prefetch:
            options = dataclasses.replace(options, prefetch=False)
            chunk = largest_batch(whole, analysis, memory_limit, analysis.batch_size, prefetch=False,
                                  fixed_bytes=pinned, prepack_weights=options.prepack_weights)
            whole.notes["prefetch_dropped"] = True
        if chunk < 1:
            if analysis.batch_size == 1:
                raise MemoryLimitError(f"the batch of {imported.source.label} has one sample: nothing to split",
                                       smallest_limit_bytes=whole.segmentation.peak_bytes)
            needed = smallest_limit(whole, analysis, 1, prefetch=options.prefetch, fixed_bytes=pinned,
                                    prepack_weights=options.prepack_weights)
            raise MemoryLimitError(
                f"memory_limit {format_size(memory_limit)} ({memory_limit} bytes) cannot be met even one sample "
                f"at a time: streaming the batch of {analysis.batch_size} needs {needed} bytes "
                f"({format_size(needed)}) with one-sample chunks", needed_bytes=needed, smallest_limit_bytes=needed)
    chunked = chunk_program(whole, analysis, chunk, memory_limit, options, pinned)
    if whole.notes.get("prefetch_dropped"):
        chunked.notes["prefetch_dropped"] = True
    return chunked


def optimal_batch_size(imported: ImportedModel, memory_limit: int, max_batch_size: int, *,
                       mode: ExecutionMode = ExecutionMode.MEMORY_OPT, input_bytes_per_sample: int | None = None,
                       output_bytes_per_sample: int | None = None, prefetch: bool = True,
                       prepack_weights: bool = True) -> int:
    """The largest batch <= ``max_batch_size`` whose plan fits ``memory_limit`` bytes (0: none).

    Read off the plan: activations scale with the batch, weights do not. The
    batch's inputs and outputs count once in the plan as graph tensors;
    ``input_bytes_per_sample`` / ``output_bytes_per_sample`` add buffers of
    that size per sample that the caller holds for the whole batch (the seed's
    ``calculate_optimal_batch_size(input_size, output_size, max_batch_size)``).
    """
    if max_batch_size < 1:
        raise OptionError(f"max_batch_size: must be at least 1, got {max_batch_size}")
    run_mode = ExecutionMode.NORMAL if mode is ExecutionMode.NORMAL else ExecutionMode.MEMORY_OPT
    options = SegmentOptions(prefetch=prefetch, prepack_weights=prepack_weights)
    whole = run_passes(imported, run_mode, None, options=options)
    analysis = batch_analysis(imported, whole.order)
    extra = (input_bytes_per_sample or 0) + (output_bytes_per_sample or 0)
    return largest_batch(whole, analysis, memory_limit, max_batch_size, prefetch=prefetch,
                         extra_bytes_per_sample=extra, prepack_weights=prepack_weights)


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
