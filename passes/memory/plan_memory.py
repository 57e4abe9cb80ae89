"""plan_memory: arena offsets for activations, the peak and its lower bounds (see :class:`PlanMemoryPass`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from hyperion.ir import ExecutionMode, Graph, TensorRole
from hyperion.passes._infra import Pass, PassResult, ensure, require
from hyperion.passes.liveness import Interval, Liveness, step_live_bytes
from hyperion.passes.memory.arena import arena_conflict, best_placement, greedy_by_size, live_peak
from hyperion.passes.program import Program

__all__ = ["MemoryPlan", "PlanMemoryPass", "arena_tensors", "greedy_by_size", "lower_bound", "plan_memory"]


@dataclass(frozen=True)
class MemoryPlan:
    offsets: Mapping[str, int]   # arena offset of every planned activation
    arena_bytes: int
    peak_bytes: int              # accounted, one step per segment
    lower_bound_bytes: int
    step_bytes: tuple[int, ...]
    live_peak_bytes: int = 0     # largest total of arena tensors live at one step
    placement: str = "largest_first"


class PlanMemoryPass(Pass):
    """Arena offsets for activations, the peak and its lower bounds.

    Rules:

    1. every activation and graph output with a known, non-zero size gets an offset in
       one arena (graph inputs are the caller's buffers and weights live elsewhere);
       two tensors whose lifetimes (liveness intervals, both ends included) overlap
       never overlap in the arena;
    2. offsets are assigned greedy-by-size (largest first, as TFLite's and XNNPACK's
       planners do), each tensor into the best-fitting gap -- the smallest that holds
       it -- among the tensors already placed whose lifetimes overlap its own
       (``memory/arena.py``, near-linear: placed tensors are indexed by time);
    3. other placement orders (last use first, longest first, first use first) are
       tried until one reaches ``live_peak_bytes``; with at most 256 arena tensors, a
       bounded search also moves the tensor at the top of the arena earlier in the
       order; the smallest arena wins, the earlier strategy on ties (``placement``
       names it);
    4. ``live_peak_bytes`` is the largest total size of arena tensors live at one
       step: no arena for these lifetimes can be smaller, so it is what
       ``arena_bytes`` is measured against (``arena_bytes / live_peak_bytes - 1`` is
       the fragmentation);
    5. ``peak_bytes`` is the maximum over steps of accounted live bytes (at one step
       per segment; segmenting may raise it, see the ``segment`` pass);
    6. ``lower_bound_bytes`` is the largest single step: its inputs, its outputs and
       the weights it needs (every weight in ``normal`` mode) -- no order or
       segmentation can go below it.

    Writes ``program.memory_plan``. Postcondition: rule 1 (no two tensors with
    overlapping lifetimes share a byte) and every offset within ``arena_bytes``.
    """

    name: ClassVar[str] = "plan_memory"

    def requires(self, program: Program) -> None:
        require(program.liveness is not None, self.name, "liveness (the 'liveness' pass)")

    def call(self, program: Program) -> PassResult:
        assert program.liveness is not None
        memory_plan = plan_memory(program.graph, program.liveness, program.planning_mode)
        modified = memory_plan != program.memory_plan
        program.memory_plan = memory_plan
        return PassResult(program, modified)

    def ensures(self, program: Program) -> None:
        plan, liveness = program.memory_plan, program.liveness
        ensure(plan is not None and liveness is not None, self.name, "no memory plan was recorded")
        assert plan is not None and liveness is not None
        intervals, sizes = arena_tensors(program.graph, liveness)
        ensure(set(plan.offsets) == set(intervals), self.name, "not every arena tensor has an offset")
        conflict = arena_conflict(intervals, sizes, plan.offsets)
        ensure(conflict is None, self.name, f"tensors {conflict} overlap in the arena while both are live")
        ensure(all(plan.offsets[n] + sizes[n] <= plan.arena_bytes for n in plan.offsets), self.name,
               "an offset reaches past the arena")


def plan_memory(graph: Graph, liveness: Liveness, mode: ExecutionMode) -> MemoryPlan:
    intervals, sizes = arena_tensors(graph, liveness)
    floor = live_peak(intervals, sizes, liveness.num_steps)
    placement, offsets, arena = best_placement(intervals, sizes, floor)
    steps = step_live_bytes(graph, liveness, mode)
    return MemoryPlan(offsets, arena, max(steps, default=0), lower_bound(graph, liveness, mode), tuple(steps),
                      floor, placement)


def arena_tensors(graph: Graph, liveness: Liveness) -> tuple[dict[str, Interval], dict[str, int]]:
    """Lifetimes and sizes of the tensors the arena holds: activations and graph outputs."""
    intervals, sizes = {}, {}
    for name, interval in liveness.intervals.items():
        tensor = graph.tensors[name]
        if tensor.role is not TensorRole.INPUT and tensor.nbytes:
            intervals[name], sizes[name] = interval, tensor.nbytes
    return intervals, sizes


def lower_bound(graph: Graph, liveness: Liveness, mode: ExecutionMode) -> int:
    """The largest single step: its inputs and outputs, and its weights (all in normal mode)."""
    sizes = {name: t.nbytes or 0 for name, t in graph.tensors.items()}
    weights = {name for name, t in graph.tensors.items() if t.role is TensorRole.WEIGHT}
    all_weights = graph.weight_bytes() if mode is ExecutionMode.NORMAL else 0
    best = 0
    for node_name in liveness.order:
        node = graph.nodes[node_name]
        touched = set(node.inputs).union(node.outputs)
        io = sum(sizes[t] for t in touched if t not in weights)
        own_weights = all_weights or sum(sizes[t] for t in touched if t in weights)
        best = max(best, io + own_weights)
    return best
