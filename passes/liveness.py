"""liveness: when every tensor is defined and when it is last used (see :class:`LivenessPass`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from hyperion.ir import ExecutionMode, Graph, TensorInfo, TensorRole
from hyperion.passes._infra import Pass, PassResult, ensure, require
from hyperion.passes.memory.costs import workspace_bytes
from hyperion.passes.program import Program

BEFORE_FIRST_STEP = -1


@dataclass(frozen=True)
class Interval:
    first: int
    last: int

    def __contains__(self, step: int) -> bool:
        return self.first <= step <= self.last


@dataclass(frozen=True)
class Liveness:
    order: tuple[str, ...]
    intervals: Mapping[str, Interval]         # graph inputs, activations, outputs
    weight_intervals: Mapping[str, Interval]  # weights, first to last use
    frees: tuple[tuple[str, ...], ...]        # per step: marked unneeded right after it

    @property
    def num_steps(self) -> int:
        return len(self.order)


class LivenessPass(Pass):
    """When every tensor is defined and when it is last used.

    Rules, for a topological order of steps 0..n-1:

    1. an activation is defined at the step of its producer and lives until the step
       of its last consumer; it is marked unneeded right after that step;
    2. an activation nobody reads (e.g. an unused optional output) dies at the step
       that defines it;
    3. a graph input is resident before step 0 (``first = -1``) and lives until its
       last use;
    4. a graph output lives until the last step and is never marked unneeded;
    5. a weight's interval spans its first and last use; whether it is resident all
       along (``normal``) or only then (``memory_opt``) is the planner's business.

    Writes ``program.liveness``. Postcondition: every tensor that is not a weight has an
    interval, and so has every weight some step reads.
    """

    name: ClassVar[str] = "liveness"

    def requires(self, program: Program) -> None:
        require(program.order is not None, self.name, "an order (the 'order' pass)")

    def call(self, program: Program) -> PassResult:
        liveness = compute_liveness(program.graph, program.order or ())
        modified = liveness != program.liveness
        program.liveness = liveness
        return PassResult(program, modified)

    def ensures(self, program: Program) -> None:
        liveness = program.liveness
        ensure(liveness is not None, self.name, "no liveness was recorded")
        assert liveness is not None
        missing = next((t.name for t in program.graph.tensors.values() if not _has_interval(liveness, t)), None)
        ensure(missing is None, self.name, f"tensor {missing!r} has no interval")


def _has_interval(liveness: Liveness, tensor: TensorInfo) -> bool:
    if tensor.role is TensorRole.WEIGHT:
        return tensor.name in liveness.weight_intervals or not tensor.consumers
    return tensor.name in liveness.intervals


def compute_liveness(graph: Graph, order: tuple[str, ...]) -> Liveness:
    step_of = {node: i for i, node in enumerate(order)}
    last_step = len(order) - 1
    intervals: dict[str, Interval] = {}
    weight_intervals: dict[str, Interval] = {}
    for tensor in graph.tensors.values():
        uses = [step_of[c] for c in tensor.consumers]
        if tensor.role is TensorRole.WEIGHT:
            if uses:
                weight_intervals[tensor.name] = Interval(min(uses), max(uses))
            continue
        first = BEFORE_FIRST_STEP if tensor.producer is None else step_of[tensor.producer]
        last = max(uses, default=first)
        if tensor.name in graph.outputs:
            last = max(last_step, first)
        intervals[tensor.name] = Interval(first, max(last, first))
    frees: list[list[str]] = [[] for _ in order]
    for name, interval in intervals.items():
        if name not in graph.outputs and 0 <= interval.last <= last_step:
            frees[interval.last].append(name)
    return Liveness(order, intervals, weight_intervals, tuple(tuple(sorted(f)) for f in frees))


def activation_live_bytes(graph: Graph, liveness: Liveness) -> list[int]:
    """Bytes of live activations and graph inputs still needed, at every step."""
    n = liveness.num_steps
    delta = [0] * (n + 1)
    for name, interval in liveness.intervals.items():
        size = graph.tensors[name].nbytes or 0
        delta[max(interval.first, 0)] += size
        delta[interval.last + 1] -= size
    live, running = [], 0
    for i in range(n):
        running += delta[i]
        live.append(running)
    return live


def step_weight_bytes(graph: Graph, liveness: Liveness, mode: ExecutionMode) -> list[int]:
    """Resident weight bytes at every step: all weights in ``normal`` mode, else the
    step's own (weights loaded per step, the finest grain)."""
    if mode is ExecutionMode.NORMAL:
        return [graph.weight_bytes()] * liveness.num_steps
    return [sum(graph.tensors[w].nbytes or 0 for w in graph.weights_of(node)) for node in liveness.order]


def step_live_bytes(graph: Graph, liveness: Liveness, mode: ExecutionMode) -> list[int]:
    """Accounted bytes at every step with one step per segment: live activations
    (the step's inputs and outputs included), graph inputs still needed, resident
    weights, and the step's kernel workspace with weights held as initializers."""
    weights = step_weight_bytes(graph, liveness, mode)
    workspace = [workspace_bytes(graph, graph.nodes[n], weights_fed=False) for n in liveness.order]
    return [a + w + k for a, w, k in zip(activation_live_bytes(graph, liveness), weights, workspace, strict=True)]
