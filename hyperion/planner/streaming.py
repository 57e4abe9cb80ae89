"""How a plan scales with the batch, and the largest batch that fits a cap.

A batched tensor (axis 0 is the sample axis, see the ``batch_separable`` pass)
has ``bytes(b) = b * bytes_per_sample``; weights and shared tensors do not
change. Every step's accounted bytes when each step is its own segment are
therefore a line in the batch, ``fixed + per_sample * b``, and the largest
batch whose plan fits is where the first of those lines crosses the cap -- read
off the plan, never found by running the model. That cap admits a plan at
that batch (the segment pass guarantees it) and none at one more sample.
"""

from __future__ import annotations

import dataclasses
import logging

from hyperion.ir import ExecutionMode, Graph, TensorInfo
from hyperion.passes import Program
from hyperion.passes.batch.separable import BatchSeparability
from hyperion.passes.liveness import compute_liveness
from hyperion.passes.pipeline import SegmentOptions, Stage, build_pipeline
from hyperion.passes.segment import single_step_bytes

log = logging.getLogger(__name__)


def scaled_graph(graph: Graph, analysis: BatchSeparability, batch: int) -> Graph:
    """``graph`` with every batched tensor resized to ``batch`` samples; edge kinds kept."""
    return graph.with_tensors({name: _scaled(info, analysis, batch) for name, info in graph.tensors.items()})


def _scaled(info: TensorInfo, analysis: BatchSeparability, batch: int) -> TensorInfo:
    if info.name not in analysis.batched or not info.shape or info.nbytes is None:
        return info
    per_sample = info.nbytes // analysis.batch_size
    return dataclasses.replace(info, shape=(batch, *info.shape[1:]), nbytes=per_sample * batch)


def per_sample_bytes(graph: Graph, analysis: BatchSeparability, names: tuple[str, ...]) -> int:
    return sum((graph.tensors[n].nbytes or 0) // analysis.batch_size for n in names if n in analysis.batched)


def stream_pinned_bytes(graph: Graph, analysis: BatchSeparability) -> int:
    """What streaming holds for the whole run: the batch's inputs and its outputs."""
    return analysis.batch_size * per_sample_bytes(graph, analysis, graph.inputs + graph.outputs)


def largest_batch(program: Program, analysis: BatchSeparability, memory_limit: int, max_batch_size: int, *,
                  prefetch: bool = True, fixed_bytes: int = 0, extra_bytes_per_sample: int = 0,
                  prepack_weights: bool = True) -> int:
    """The largest batch <= ``max_batch_size`` whose plan fits ``memory_limit``; 0 if none does.

    ``fixed_bytes`` are held whatever the batch (streaming: the whole batch's
    inputs and outputs); ``extra_bytes_per_sample`` scale with it (a caller's
    buffers).
    """
    order = program.order or program.graph.file_order()
    single, lines = _cost_lines(program.graph, order, analysis, program.mode, prefetch, prepack_weights,
                                not fixed_bytes)
    if max(single, default=0) + fixed_bytes + extra_bytes_per_sample > memory_limit:
        return 0
    best = max_batch_size
    for fixed, per_sample in lines:
        fixed += fixed_bytes
        per_sample += extra_bytes_per_sample
        if per_sample > 0:
            best = min(best, (memory_limit - fixed) // per_sample)
    best = max(best, 1)
    if fixed_bytes:
        return best
    # The caller's inputs count from 1 MiB on (segment rule 7): past the lines' samples, a
    # larger batch can cross that size, so the batch is checked at its own size, and bisected
    # down while it does not fit (more samples never need less).
    def fits(batch: int) -> bool:
        graph = scaled_graph(program.graph, analysis, batch)
        steps = single_step_bytes(graph, compute_liveness(graph, order), program.mode, prefetch=prefetch,
                                  prepack_weights=prepack_weights, caller_inputs=True)
        return max(steps, default=0) + extra_bytes_per_sample * batch <= memory_limit

    if fits(best):
        return best
    low, high = 1, best   # fits(low): checked at one sample above
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def smallest_limit(program: Program, analysis: BatchSeparability, batch: int, *, prefetch: bool = True,
                   fixed_bytes: int = 0, extra_bytes_per_sample: int = 0, prepack_weights: bool = True) -> int:
    """The smallest cap that admits a plan at ``batch`` samples."""
    order = program.order or program.graph.file_order()
    single, lines = _cost_lines(program.graph, order, analysis, program.mode, prefetch, prepack_weights,
                                not fixed_bytes)
    if batch == 1:
        return max(single, default=0) + fixed_bytes + extra_bytes_per_sample
    return max(fixed + fixed_bytes + (per_sample + extra_bytes_per_sample) * batch for fixed, per_sample in lines)


def _cost_lines(graph: Graph, order: tuple[str, ...], analysis: BatchSeparability, mode: ExecutionMode,
                prefetch: bool, prepack_weights: bool, caller_inputs: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Per step, the single-step plan's bytes at one sample, and its (fixed, per-sample) line
    from two samples on: exact, activations scale with the batch and weights do not. From
    two on, since a kernel's workspace may not (a fed Conv's MLAS buffers are one per
    thread, at most one per image: costs.workspace_bytes). ``caller_inputs``: a plan of the whole
    batch counts the inputs the caller holds (segment rule 7); streaming pins them instead."""
    one, two, three = (single_step_bytes(g, compute_liveness(g, order), mode, prefetch=prefetch,
                                         prepack_weights=prepack_weights, caller_inputs=caller_inputs)
                       for g in (scaled_graph(graph, analysis, n) for n in (1, 2, 3)))
    return one, [(3 * b - 2 * c, c - b) for b, c in zip(two, three, strict=True)]


def chunk_program(program: Program, analysis: BatchSeparability, chunk: int, memory_limit: int | None,
                  options: SegmentOptions, pinned_bytes: int = 0) -> Program:
    """The plan of one chunk of ``chunk`` samples, in the order chosen for the whole batch."""
    chunked = Program(scaled_graph(program.graph, analysis, chunk), mode=ExecutionMode.STREAMING,
                      memory_limit=memory_limit, order=program.order, batch_separability=analysis,
                      batch_chunk=chunk)
    build_pipeline(ExecutionMode.STREAMING, options, stages=(Stage.PLAN,), pinned_bytes=pinned_bytes)(chunked)
    return chunked
