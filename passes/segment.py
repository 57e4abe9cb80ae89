"""segment: group consecutive steps into segments, each one onnxruntime session.

Rules:

* with no cap, the whole model is one segment (unless ``max_segment_steps``
  asks for smaller ones, e.g. one node per segment);
* a segment holds its inputs until it returns: a tensor defined before the
  segment and last read inside it stays accounted until the segment's last step;
* in ``memory_opt`` mode a segment's weights are all resident for the whole
  segment (loaded before it, released after it); in ``normal`` mode every
  weight is resident all the time;
* segments are grown greedily, step by step, while the segment's accounted peak
  stays at or under the cap; a step that does not fit even alone raises
  :class:`~hyperion.errors.MemoryLimitError` naming it, the bytes it needs and
  the smallest cap that works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hyperion.errors import MemoryLimitError
from hyperion.ir import ExecutionMode, Graph, Program
from hyperion.passes import Pass, PassResult, require
from hyperion.passes.liveness import Liveness, activation_live_bytes
from hyperion.units import format_size


@dataclass(frozen=True)
class Span:
    """Steps ``start`` to ``stop - 1`` of the order."""

    start: int
    stop: int


@dataclass(frozen=True)
class Segmentation:
    spans: tuple[Span, ...]
    step_bytes: tuple[int, ...]   # accounted bytes per step, with segments' held inputs and weights

    @property
    def peak_bytes(self) -> int:
        return max(self.step_bytes, default=0)


@dataclass(frozen=True)
class SegmentPass(Pass):
    name: ClassVar[str] = "segment"
    max_segment_steps: int | None = None

    def requires(self, program: Program) -> None:
        require(program.liveness is not None, self.name, "liveness (the 'liveness' pass)")

    def call(self, program: Program) -> PassResult:
        mode = ExecutionMode.NORMAL if program.mode is ExecutionMode.NORMAL else ExecutionMode.MEMORY_OPT
        program.segmentation = segment(program.graph, program.liveness, mode, program.memory_limit,
                                       self.max_segment_steps)
        return PassResult(program, False)


class _SegmentCost:
    """Accounted bytes of a growing segment, extended one step at a time.

    Step i of a segment starting at ``first`` holds: the live activations of i,
    the segment's inputs already read for the last time (held until it returns),
    and the segment's weights (every weight in ``normal`` mode).
    """

    def __init__(self, graph: Graph, liveness: Liveness, mode: ExecutionMode) -> None:
        self.graph, self.liveness, self.mode = graph, liveness, mode
        self.activations = activation_live_bytes(graph, liveness)
        self.deaths: list[list[str]] = [[] for _ in liveness.order]
        for name, interval in liveness.intervals.items():
            if 0 <= interval.last < len(self.deaths):
                self.deaths[interval.last].append(name)

    def _weights(self, step: int) -> set[str]:
        if self.mode is ExecutionMode.NORMAL:
            return set()
        return set(self.graph.weights_of(self.liveness.order[step]))

    def _bytes(self, tensors: set[str] | list[str]) -> int:
        return sum(self.graph.tensors[t].nbytes or 0 for t in tensors)

    def start(self, step: int) -> None:
        self.first, self.held = step, 0
        self.step_activation = [self.activations[step]]
        self.activation_peak = self.activations[step]
        self.weights = self._weights(step)
        self.weight_bytes = (self.graph.weight_bytes() if self.mode is ExecutionMode.NORMAL
                             else self._bytes(self.weights))

    def grown(self, step: int) -> tuple[int, int, set[str]]:
        """(peak, held bytes, new weights) of the segment grown to include ``step``."""
        held = self.held + self._bytes([t for t in self.deaths[step - 1]
                                        if self.liveness.intervals[t].first < self.first])
        new_weights = self._weights(step) - self.weights
        activation_peak = max(self.activation_peak, self.activations[step] + held)
        return activation_peak + self.weight_bytes + self._bytes(new_weights), held, new_weights

    def extend(self, step: int) -> None:
        _, self.held, new_weights = self.grown(step)
        self.weights |= new_weights
        self.weight_bytes += self._bytes(new_weights)
        self.step_activation.append(self.activations[step] + self.held)
        self.activation_peak = max(self.activation_peak, self.step_activation[-1])

    def peak(self) -> int:
        return self.activation_peak + self.weight_bytes

    def step_bytes(self) -> list[int]:
        return [b + self.weight_bytes for b in self.step_activation]


def segment(graph: Graph, liveness: Liveness, mode: ExecutionMode, memory_limit: int | None,
            max_segment_steps: int | None = None) -> Segmentation:
    n = liveness.num_steps
    if n == 0:
        return Segmentation((), ())
    cost = _SegmentCost(graph, liveness, mode)
    _check_single_steps(graph, liveness, cost, mode, memory_limit)
    spans: list[Span] = []
    step_bytes: list[int] = []
    cost.start(0)
    start = 0
    for step in range(1, n):
        too_long = max_segment_steps is not None and step - start >= max_segment_steps
        fits = memory_limit is None or cost.grown(step)[0] <= memory_limit
        if fits and not too_long:
            cost.extend(step)
            continue
        spans.append(Span(start, step))
        step_bytes += cost.step_bytes()
        cost.start(step)
        start = step
    spans.append(Span(start, n))
    step_bytes += cost.step_bytes()
    return Segmentation(tuple(spans), tuple(step_bytes))


def _check_single_steps(graph: Graph, liveness: Liveness, cost: _SegmentCost, mode: ExecutionMode,
                        memory_limit: int | None) -> None:
    if memory_limit is None:
        return
    singles = []
    for step in range(liveness.num_steps):
        cost.start(step)
        singles.append(cost.peak())
    smallest = max(singles)
    if smallest > memory_limit:
        worst = singles.index(smallest)
        node = liveness.order[worst]
        raise MemoryLimitError(
            f"memory_limit {format_size(memory_limit)} ({memory_limit} bytes) cannot be met in "
            f"{mode.value} mode: step {worst} (node {node!r}, {graph.nodes[node].op_type}) needs "
            f"{smallest} bytes ({format_size(smallest)}); the smallest limit that works in this mode is "
            f"{smallest} bytes", node=node, needed_bytes=smallest, smallest_limit_bytes=smallest)
