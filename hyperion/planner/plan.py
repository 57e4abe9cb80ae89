"""From an imported model and options to a :class:`~hyperion.schedule.Schedule`.

Runs the pass pipeline in the requested mode and, for ``adaptive``, picks the
fastest mode whose plan fits the cap -- normal if everything fits, else
memory_opt, else memory_opt over chunks of the batch (streaming) -- recording
the choice and the reason. :func:`optimal_batch_size` reads the largest batch
that fits a cap off the plan.
"""

from __future__ import annotations

import dataclasses
import logging

from hyperion.errors import (
    MemoryLimitError,
    OptionError,
    PassError,
    ShapeError,
    UnsupportedModelError,
)
from hyperion.frontend import ImportedModel
from hyperion.frontend.bounds import unsized_tensors
from hyperion.ir import ExecutionMode
from hyperion.passes import Program
from hyperion.passes.batch.separable import analyze
from hyperion.passes.memory.ort_arena import MAPPED_BLOCK_BYTES
from hyperion.passes.pipeline import SegmentOptions, Stage, build_pipeline
from hyperion.planner.dynamic import plan_dynamic
from hyperion.planner.emit import build_schedule
from hyperion.planner.streaming import (
    chunk_program,
    largest_batch,
    smallest_limit,
    stream_pinned_bytes,
)
from hyperion.schedule import Schedule
from hyperion.units import format_size

log = logging.getLogger(__name__)


def parse_mode(mode: str | ExecutionMode) -> ExecutionMode:
    try:
        return ExecutionMode(mode)
    except ValueError:
        raise OptionError(f"mode: unknown mode {mode!r}; choose one of "
                          f"{', '.join(m.value for m in ExecutionMode)}") from None


class Planner:
    """The passes of one compile over one graph, each stage run only as often as its
    inputs change: edge kinds once, the order once per planning mode (normal, or
    memory_opt for every other mode), and liveness, arena and segments for every
    (mode, cap, options) tried. Adaptive mode tries up to four plans on one graph;
    they share the classification and the orders.
    """

    def __init__(self, imported: ImportedModel, options: SegmentOptions | None = None) -> None:
        self.imported = imported
        self.options = options or SegmentOptions()
        self.classified = Program(imported.graph)
        build_pipeline(ExecutionMode.NORMAL, stages=(Stage.CLASSIFY,))(self.classified)
        self._ordered: dict[ExecutionMode, Program] = {}

    def ordered(self, mode: ExecutionMode) -> Program:
        """The classified program with the order of ``mode``'s planning mode (computed once)."""
        planning_mode = mode.planning_mode
        if planning_mode not in self._ordered:
            program = dataclasses.replace(self.classified, mode=planning_mode)
            build_pipeline(planning_mode, stages=(Stage.ORDER,))(program)
            self._ordered[planning_mode] = program
        return self._ordered[planning_mode]

    def planned(self, mode: ExecutionMode, memory_limit: int | None,
                options: SegmentOptions | None = None) -> Program:
        """A fresh plan of ``mode`` under ``memory_limit``, on the order of its planning mode."""
        program = dataclasses.replace(self.ordered(mode), mode=mode, memory_limit=memory_limit)
        build_pipeline(mode, options or self.options, stages=(Stage.BATCH, Stage.PLAN))(program)
        return program

    def run(self, mode: ExecutionMode, memory_limit: int | None) -> Program:
        """The plan of ``mode``; in memory_opt, without prefetch if prefetch does not fit."""
        try:
            return self.planned(mode, memory_limit)
        except MemoryLimitError:
            if mode is ExecutionMode.NORMAL or not self.options.for_mode(mode).prefetch:
                raise
        # The double buffer does not fit: each segment's weights are loaded when it starts.
        program = self.planned(mode, memory_limit, dataclasses.replace(self.options, prefetch=False))
        program.prefetch_dropped = True
        return program


def run_passes(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
               max_segment_steps: int | None = None, options: SegmentOptions | None = None) -> Program:
    """Every pass of ``mode``'s pipeline on ``imported``: one plan, as :class:`Planner` makes it."""
    return Planner(imported, options or SegmentOptions(max_segment_steps)).run(mode, memory_limit)


def plan(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
         max_segment_steps: int | None = None, *, prefetch: bool | None = None,
         weight_cache_bytes: int | None = None, prepack_weights: bool | None = None,
         keep_heap: bool = True) -> Schedule:
    """The schedule of ``imported`` in ``mode`` under ``memory_limit`` bytes.

    ``prefetch``: in memory_opt, create the next segment's session while the
    current one computes (accounted: both are resident then); ``None``: when
    weights are pre-packed.
    ``weight_cache_bytes``: the most bytes of sessions kept alive across runs
    in memory_opt (``None``: as many as the cap allows; 0: none).
    ``prepack_weights=False``: sessions will not pre-pack weights, so each holds
    its weights at their own size (recorded in the schedule: the runtime must
    then run unpacked); ``None``: packed in normal mode, fed in the others
    (:meth:`SegmentOptions.for_mode`).
    ``keep_heap=False``: runs give every large freed block back to the OS, whatever the cap
    leaves (segment rule 14).
    """
    options = SegmentOptions(max_segment_steps, prefetch, weight_cache_bytes, prepack_weights, keep_heap=keep_heap)
    return _plan(imported, mode, memory_limit, options)


def _plan(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
          options: SegmentOptions) -> Schedule:
    if memory_limit is not None and unsized_tensors(imported):
        # Sizes only the data decides: bounded, or re-planned at run time (planner/dynamic.py).
        # Its prefix and the rest planned at run time share one heap: neither keeps any.
        unkept = dataclasses.replace(options, keep_heap=False)
        return plan_dynamic(imported, lambda sized: _plan_sized(sized, mode, memory_limit, unkept))
    return _plan_sized(imported, mode, memory_limit, options)


def _plan_sized(imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
                options: SegmentOptions) -> Schedule:
    planner = Planner(imported, options)
    if mode is ExecutionMode.STREAMING:
        program = plan_streaming(planner, memory_limit)
        return build_schedule(imported, program, requested=mode, reason=f"streaming mode was requested; "
                              f"{_chunk_phrase(program)}")
    if mode is not ExecutionMode.ADAPTIVE:
        try:
            program = planner.run(mode, memory_limit)
        except MemoryLimitError as error:
            raise _verified_refusal(planner, mode, error) from None
        return build_schedule(imported, program, requested=mode, reason=f"{mode.value} mode was requested")
    if memory_limit is None:
        program = planner.run(ExecutionMode.NORMAL, None)
        return build_schedule(imported, program, requested=mode,
                              reason="no memory limit: normal mode, every weight resident")
    program, reason = _adaptive(planner, memory_limit)
    return build_schedule(imported, program, requested=mode, reason=reason)


def _adaptive(planner: Planner, memory_limit: int) -> tuple[Program, str]:
    """The fastest mode whose plan fits: normal, else memory_opt, else streaming."""
    limit = format_size(memory_limit)
    try:
        program = planner.run(ExecutionMode.NORMAL, memory_limit)
        reason = f"normal mode fits: peak {format_size(_peak_bytes(program))} <= limit {limit}"
        return _keeping_an_arena(planner, memory_limit, program, reason)
    except MemoryLimitError as normal_error:
        normal_needs = f"normal mode needs at least {format_size(normal_error.smallest_limit_bytes)} > limit {limit}"
        normal_smallest = normal_error.smallest_limit_bytes
    try:
        program = planner.run(ExecutionMode.MEMORY_OPT, memory_limit)
        return program, (f"{normal_needs}; memory_opt fits with peak "
                         f"{format_size(_peak_bytes(program))}")
    except MemoryLimitError as error:
        memory_opt_error = error
    try:
        program = plan_streaming(planner, memory_limit)
    except (MemoryLimitError, UnsupportedModelError) as streaming_error:
        # The smallest cap adaptive can meet: the smaller of normal's and memory_opt's, each
        # planned at until a plan fits (memory_opt's can exceed normal's: it accounts a
        # prefetched segment), so that it is never above what either mode names alone.
        # Streaming's figure is read off an uncapped plan, so it is no promise.
        memory_opt_refusal = _verified_refusal(planner, ExecutionMode.MEMORY_OPT, memory_opt_error)
        smallest = min(_verified_smallest(planner, ExecutionMode.NORMAL, normal_smallest),
                       memory_opt_refusal.smallest_limit_bytes)
        raise MemoryLimitError(
            f"{memory_opt_refusal}; streaming cannot help: {streaming_error}; the smallest limit that works in "
            f"adaptive mode is {smallest} bytes ({format_size(smallest)})", node=memory_opt_error.node,
            needed_bytes=memory_opt_error.needed_bytes, smallest_limit_bytes=smallest) from None
    return program, (f"{normal_needs}; memory_opt needs at least "
                     f"{format_size(memory_opt_error.smallest_limit_bytes)} for the whole batch; "
                     f"{_chunk_phrase(program)}")


def _keeping_an_arena(planner: Planner, memory_limit: int, normal: Program, reason: str) -> tuple[Program, str]:
    """``normal``, unless it leaves no room to keep the shared arena (segment rule 14) and a
    memory_opt plan keeps one while mapping fewer weight bytes again each run than normal's
    runs fault activations in: then that one. Under a cap without the arena, every tensor
    of 1 MiB or more is faulted in on every run; with it, only the weights memory_opt does not
    cache are (the light ShuffleNet at half of onnxruntime's RSS: 13.1 ms a run in normal
    mode, 8.5 and 5.2 ms in two measurements of memory_opt with a 5.3 MiB arena)."""
    if _arena_bytes(normal):
        return normal, reason
    try:
        streamed = planner.run(ExecutionMode.MEMORY_OPT, memory_limit)
    except MemoryLimitError:
        return normal, reason
    faulted, remapped = _faulted_activation_bytes(normal), _remapped_weight_bytes(streamed)
    if not _arena_bytes(streamed) or remapped >= faulted:
        return normal, reason
    return streamed, (f"{reason}, but leaves no room to keep an arena between runs; memory_opt keeps one of "
                      f"{format_size(_arena_bytes(streamed))} (peak {format_size(_peak_bytes(streamed))}) and maps "
                      f"{format_size(remapped)} of weights again each run where normal's runs fault "
                      f"{format_size(faulted)} of activations in")


def _arena_bytes(program: Program) -> int:
    assert program.segmentation is not None  # the segment pass ran
    return program.segmentation.kept_heap_bytes


def _faulted_activation_bytes(program: Program) -> int:
    """What a run without the arena faults in: every activation glibc maps on its own."""
    assert program.liveness is not None
    sizes = (program.graph.tensors[name].nbytes or 0 for name, interval in program.liveness.intervals.items()
             if interval.first >= 0)
    return sum(size for size in sizes if size >= MAPPED_BLOCK_BYTES)


def _remapped_weight_bytes(program: Program) -> int:
    """The weights of segments whose sessions do not keep them: mapped again every run."""
    assert program.segmentation is not None and program.liveness is not None
    graph, order, segmentation = program.graph, program.liveness.order, program.segmentation
    weights = {name for index, span in enumerate(segmentation.spans) if index not in segmentation.cached
               for node in order[span.start:span.stop] for name in graph.nodes[node].inputs if graph.is_weight(name)}
    return sum(graph.tensors[name].nbytes or 0 for name in weights)


SMALLEST_LIMIT_ROUNDS = 12
# Rounds after those that double the cap, so that the limit named is one a plan was made at.
DOUBLING_ROUNDS = 48
# Bisection rounds between a refused cap and a larger one that works, when the first cap named
# did not work: each halves the gap (a plan each; only refused compiles pay them).
SHRINK_ROUNDS = 4


def _verified_refusal(planner: Planner, mode: ExecutionMode, error: MemoryLimitError) -> MemoryLimitError:
    """``error``, a refusal of ``mode``, with the smallest limit it names planned at until a
    plan fits (:func:`_verified_smallest`); itself when that limit works as named."""
    smallest = _verified_smallest(planner, mode, error.smallest_limit_bytes)
    if smallest == error.smallest_limit_bytes:
        return error
    return MemoryLimitError(
        f"{error}; planned at that limit, no plan fits (under another cap the tile and order passes choose "
        f"other splits and another order): the smallest limit found to work in {mode.value} mode is {smallest} "
        f"bytes ({format_size(smallest)})", node=error.node, needed_bytes=error.needed_bytes,
        smallest_limit_bytes=smallest)


def _verified_smallest(planner: Planner, mode: ExecutionMode, smallest: int) -> int:
    """A cap at which ``mode``'s plan fits, as small as found: ``smallest`` -- a mode's smallest
    limit read off its plan under a smaller cap -- planned at, and raised until a plan
    fits. The passes before segmentation split steps and order them for the cap they are given,
    so which caps fit is not monotone: a plan at the cap named may need more (it is then raised
    to what that plan names, or by 1/64 when it names no more, and doubled once that has not
    fitted for ``SMALLEST_LIMIT_ROUNDS``), and one below it may fit (once a larger cap works,
    the gap down to the last refused one is bisected a few rounds). Only compiles that are
    refused pay these plans."""
    def fits(limit: int) -> tuple[bool, int]:
        try:
            planner.run(mode, limit)
            return True, limit
        except MemoryLimitError as error:
            return False, error.smallest_limit_bytes

    candidate, refused = smallest, smallest - 1
    for round_ in range(SMALLEST_LIMIT_ROUNDS + DOUBLING_ROUNDS):
        works, named = fits(candidate)
        if works:
            break
        refused = candidate
        candidate = named if named > candidate else candidate + max(1, candidate // 64)
        if round_ >= SMALLEST_LIMIT_ROUNDS:   # the caps named creep up: leap instead
            candidate = max(candidate, 2 * refused)
    else:
        # Under a cap above every byte the model has, the plan holds everything at once.
        raise PassError(f"no {mode.value} plan fits under any limit up to {refused} bytes "
                        f"({format_size(refused)}), starting from the {smallest} bytes a plan named")
    if candidate == smallest:   # it works as named
        return candidate
    for _ in range(SHRINK_ROUNDS):
        middle = (refused + candidate) // 2
        if middle <= refused:
            break
        if fits(middle)[0]:
            candidate = middle
        else:
            refused = middle
    return candidate


def _peak_bytes(program: Program) -> int:
    assert program.segmentation is not None  # the segment pass ran
    return program.segmentation.peak_bytes


def _chunk_phrase(program: Program) -> str:
    analysis = program.batch_separability
    assert analysis is not None  # a streaming plan
    return (f"the batch of {analysis.batch_size} runs in chunks of {program.batch_chunk} with peak "
            f"{format_size(_peak_bytes(program))}")


def plan_streaming(planner: Planner, memory_limit: int | None) -> Program:
    """The plan of the largest chunk of the batch that fits, in memory_opt mode."""
    imported, options = planner.imported, planner.options.for_mode(ExecutionMode.STREAMING)
    try:
        whole = planner.run(ExecutionMode.STREAMING, None)
    except UnsupportedModelError as refusal:
        raise UnsupportedModelError(f"{imported.source.label}: mode 'streaming': {refusal}") from None
    analysis = whole.batch_separability
    assert analysis is not None  # the batch_separable pass ran
    if analysis.batch_size < 1:
        raise ShapeError(f"{imported.source.label}: mode 'streaming': the batch (axis 0 of the inputs) has "
                         f"{analysis.batch_size} samples: nothing to split; give a batch of at least one sample")
    pinned = stream_pinned_bytes(imported.graph, analysis)
    chunk = analysis.batch_size
    if memory_limit is not None:
        chunk = largest_batch(whole, analysis, memory_limit, analysis.batch_size, prefetch=options.prefetch,
                              fixed_bytes=pinned, prepack_weights=options.prepack_weights)
        if chunk < 1 and options.prefetch:
            options = dataclasses.replace(options, prefetch=False)
            chunk = largest_batch(whole, analysis, memory_limit, analysis.batch_size, prefetch=False,
                                  fixed_bytes=pinned, prepack_weights=options.prepack_weights)
            whole.prefetch_dropped = True
        if chunk < 1:
            if analysis.batch_size == 1:
                raise MemoryLimitError(f"the batch of {imported.source.label} has one sample: nothing to split",
                                       smallest_limit_bytes=_peak_bytes(whole))
            needed = smallest_limit(whole, analysis, 1, prefetch=options.prefetch, fixed_bytes=pinned,
                                    prepack_weights=options.prepack_weights)
            raise MemoryLimitError(
                f"memory_limit {format_size(memory_limit)} ({memory_limit} bytes) cannot be met even one sample "
                f"at a time: streaming the batch of {analysis.batch_size} needs {needed} bytes "
                f"({format_size(needed)}) with one-sample chunks", needed_bytes=needed, smallest_limit_bytes=needed)
    chunked = chunk_program(whole, analysis, chunk, memory_limit, options, pinned)
    chunked.prefetch_dropped = whole.prefetch_dropped
    return chunked


def optimal_batch_size(imported: ImportedModel, memory_limit: int, max_batch_size: int, *,
                       mode: ExecutionMode = ExecutionMode.MEMORY_OPT, input_bytes_per_sample: int | None = None,
                       output_bytes_per_sample: int | None = None, prefetch: bool | None = None,
                       prepack_weights: bool | None = None) -> int:
    """The largest batch <= ``max_batch_size`` whose plan fits ``memory_limit`` bytes (0: none).

    Read off the plan: activations scale with the batch, weights do not. The
    batch's inputs and outputs count once in the plan as graph tensors;
    ``input_bytes_per_sample`` / ``output_bytes_per_sample`` add buffers of
    that size per sample that the caller holds for the whole batch (the seed's
    ``calculate_optimal_batch_size(input_size, output_size, max_batch_size)``).
    """
    if max_batch_size < 1:
        raise OptionError(f"max_batch_size: must be at least 1, got {max_batch_size}")
    run_mode = mode.planning_mode
    options = SegmentOptions(prefetch=prefetch, prepack_weights=prepack_weights).for_mode(run_mode)
    whole = Planner(imported, options).run(run_mode, None)
    analysis = analyze(whole.graph, whole.order)
    extra = (input_bytes_per_sample or 0) + (output_bytes_per_sample or 0)
    assert options.prefetch is not None and options.prepack_weights is not None  # resolved for run_mode
    return largest_batch(whole, analysis, memory_limit, max_batch_size, prefetch=options.prefetch,
                         extra_bytes_per_sample=extra, prepack_weights=options.prepack_weights)
