"""plan_memory: arena offsets for activations, the peak and a lower bound.

Rules:

* every activation and graph output gets an offset in one arena; two tensors
  whose lifetimes overlap never overlap in the arena;
* offsets are assigned greedy-by-size (largest first, as TFLite's and
  XNNPACK's planners do), each into the best-fitting gap among the tensors
  already placed whose lifetimes overlap it;
* ``peak_bytes`` is the maximum over steps of accounted live bytes (at one step
  per segment; segmenting may raise it, see the ``segment`` pass);
* ``lower_bound_bytes`` is the largest single step: its inputs, its outputs and
  the weights it needs (every weight in ``normal`` mode) — no order or
  segmentation can go below it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from hyperion.ir import ExecutionMode, Graph, Program, TensorRole
from hyperion.passes import Pass, PassResult, require
from hyperion.passes.liveness import Interval, Liveness, step_live_bytes
from hyperion.passes.order import _planning_mode


@dataclass(frozen=True)
class MemoryPlan:
    offsets: Mapping[str, int]   # arena offset of every planned activation
    arena_bytes: int
    peak_bytes: int              # accounted, one step per segment
    lower_bound_bytes: int
    step_bytes: tuple[int, ...]


class PlanMemoryPass(Pass):
    name: ClassVar[str] = "plan_memory"

    def requires(self, program: Program) -> None:
        require(program.liveness is not None, self.name, "liveness (the 'liveness' pass)")

    def call(self, program: Program) -> PassResult:
        program.memory_plan = plan_memory(program.graph, program.liveness, _planning_mode(program.mode))
        return PassResult(program, False)


def plan_memory(graph: Graph, liveness: Liveness, mode: ExecutionMode) -> MemoryPlan:
    planned = {name: interval for name, interval in liveness.intervals.items()
               if graph.tensors[name].role is not TensorRole.INPUT and graph.tensors[name].nbytes}
    offsets = greedy_by_size(planned, {n: graph.tensors[n].nbytes or 0 for n in planned})
    arena = max((offsets[n] + (graph.tensors[n].nbytes or 0) for n in offsets), default=0)
    steps = step_live_bytes(graph, liveness, mode)
    return MemoryPlan(offsets, arena, max(steps, default=0), lower_bound(graph, liveness, mode), tuple(steps))


def greedy_by_size(intervals: Mapping[str, Interval], sizes: Mapping[str, int]) -> dict[str, int]:
    """Offsets such that tensors with overlapping intervals never share bytes."""
    placed: list[tuple[int, int, Interval]] = []  # (offset, size, interval)
    offsets: dict[str, int] = {}
    for name in sorted(intervals, key=lambda n: (-sizes[n], intervals[n].first, n)):
        size, interval = sizes[name], intervals[name]
        busy = sorted((off, off + sz) for off, sz, other in placed
                      if other.first <= interval.last and interval.first <= other.last)
        best_offset, best_gap, cursor = None, None, 0
        for start, end in busy:
            gap = start - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best_offset, best_gap = cursor, gap
            cursor = max(cursor, end)
        offset = best_offset if best_offset is not None else cursor
        offsets[name] = offset
        placed.append((offset, size, interval))
    return offsets


def lower_bound(graph: Graph, liveness: Liveness, mode: ExecutionMode) -> int:
    all_weights = graph.weight_bytes() if mode is ExecutionMode.NORMAL else 0
    best = 0
    for node_name in liveness.order:
        node = graph.nodes[node_name]
        io = sum(graph.tensors[t].nbytes or 0 for t in set(node.inputs) | set(node.outputs)
                 if graph.tensors[t].role is not TensorRole.WEIGHT)
        weights = all_weights or sum(graph.tensors[w].nbytes or 0 for w in graph.weights_of(node_name))
        best = max(best, io + weights)
    return best
