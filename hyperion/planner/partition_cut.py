"""Where to cut a compiled order into pipeline stages (the planning half of :mod:`hyperion.planner.partition`).

Per step: an estimated time (FLOPs and bytes touched) or its weight bytes, the bytes a stage
would hold for it, and the activation bytes a cut before it would carry. Then, over
contiguous ranges of steps (prefix sums, so any range costs O(1)):

1. the smallest slowest-stage cost of a cut into N stages whose every stage fits the cap:
   a binary search over a greedy cut (each stage as long as the bound allows -- exact for
   contiguous cuts, since a range's cost and need only grow as it grows);
2. among the cuts within ``BALANCE_SLACK`` of that bound, the one whose cuts carry the
   fewest bytes: a dynamic programme over stops, the best earlier stop from a sliding-window
   minimum.

Pure: the IR in, step indices out.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from hyperion.errors import OptionError, PartitionError
from hyperion.ir import Graph
from hyperion.passes.memory.costs import packed_bytes, resident_bytes
from hyperion.units import format_size

log = logging.getLogger(__name__)

Balance = Literal["time", "bytes"]
# A rough CPU (2 cores with AVX2, float32): what turns FLOPs and bytes touched into an
# estimated time. Only the ratio between steps matters for balancing.
ESTIMATED_FLOPS_PER_S = 50e9
ESTIMATED_BYTES_PER_S = 10e9
# Cuts whose slowest stage is within this fraction of the best are equally balanced;
# among them the one with the fewest boundary bytes wins.
BALANCE_SLACK = 0.05


# -- per-step facts ---------------------------------------------------------------------
@dataclass(frozen=True)
class StepFacts:
    order: tuple[str, ...]
    seconds: list[float]        # estimated time of each step
    weight_bytes: list[int]     # held bytes of the weights first read at each step
    live_bytes: list[int]       # activation bytes live during each step (whole model), plus the
                                # largest weight onnxruntime packs: its original is held while packing
    cut_bytes: list[int]        # activation bytes crossing a cut before step i (index len(order): 0)


def _numel(shape: tuple[int | str, ...] | None) -> int:
    return math.prod(int(d) for d in shape) if shape is not None and all(isinstance(d, int) for d in shape) else 0


def step_flops(graph: Graph, node_name: str) -> int:
    """Multiply-adds x 2 of the ops that dominate time; 0 for the others (bytes cover them)."""
    node = graph.nodes[node_name]
    if not node.outputs:
        return 0
    out = _numel(graph.tensors[node.outputs[0]].shape)
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "FusedMatMul"):
        a = graph.tensors[node.inputs[0]].shape
        if a and isinstance(a[-1], int):
            k = a[-1] if node.op_type != "Gemm" or not node.int_attribute("transA", 0) else a[0]
            return 2 * out * int(k)
    if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = graph.tensors[node.inputs[1]].shape
        if w:
            per_output = _numel(w[1:]) if node.op_type == "Conv" else _numel(w) // max(1, int(w[0]))
            return 2 * out * per_output
    return 0


def step_facts(graph: Graph, order: Sequence[str], balance: Balance) -> StepFacts:
    position = {name: i for i, name in enumerate(order)}
    seconds, weights, seen = [], [], set()
    for name in order:
        node = graph.nodes[name]
        touched = sum(graph.tensors[t].nbytes or 0 for t in (*node.inputs, *node.outputs))
        seconds.append(step_flops(graph, name) / ESTIMATED_FLOPS_PER_S + touched / ESTIMATED_BYTES_PER_S)
        new = [w for w in node.inputs if graph.is_weight(w) and w not in seen]
        seen.update(new)
        weights.append(sum(resident_bytes(graph, w) for w in new))
    if balance == "bytes":
        seconds = [float(b) for b in weights]
    steps = len(order)
    live = [0] * (steps + 1)
    cut = [0] * (steps + 2)
    for tensor in graph.tensors.values():
        if graph.is_weight(tensor.name) or not tensor.nbytes:
            continue
        first = position[tensor.producer] if tensor.producer in position else 0
        uses = [position[c] for c in tensor.consumers if c in position]
        last = steps - 1 if tensor.name in graph.outputs else max(uses, default=first)
        live[first] += tensor.nbytes
        live[last + 1] -= tensor.nbytes
        if tensor.producer in position and uses and max(uses) > first:
            cut[first + 1] += tensor.nbytes        # crosses every cut after its producer ...
            cut[max(uses) + 1] -= tensor.nbytes    # ... up to (and including) the one before its last use
    packing = max((graph.tensors[w].nbytes or 0 for w in seen if packed_bytes(graph, w) is not None), default=0)
    live_bytes = [b + packing for b in list(accumulate(live))[:steps]]
    return StepFacts(tuple(order), seconds, weights, live_bytes, list(accumulate(cut))[:steps + 1])



# -- the cut ----------------------------------------------------------------------------
class _Ranges:
    """Cost and memory need of any contiguous range of steps, from prefix sums."""

    def __init__(self, facts: StepFacts) -> None:
        self.facts = facts
        self.time = [0.0, *accumulate(facts.seconds)]
        self.weights = [0, *accumulate(facts.weight_bytes)]

    def cost(self, start: int, stop: int) -> float:
        return self.time[stop] - self.time[start]

    def lowest_starts(self, bound: float, cap: int | None) -> list[int]:
        """For every stop, the lowest start whose range [start, stop) costs at most ``bound``
        and needs at most ``cap`` (two pointers; a deque keeps the window's live maximum)."""
        live, lows, window, start = self.facts.live_bytes, [0], deque[int](), 0
        for stop in range(1, len(live) + 1):
            while window and live[window[-1]] <= live[stop - 1]:
                window.pop()
            window.append(stop - 1)
            while start < stop - 1 and not self.fits(start, stop, bound, cap, live[window[0]]):
                start += 1
                while window[0] < start:
                    window.popleft()
            lows.append(start)
        return lows

    def fits(self, start: int, stop: int, bound: float, cap: int | None, live_max: int) -> bool:
        need = self.weights[stop] - self.weights[start] + live_max
        return self.cost(start, stop) <= bound and (cap is None or need <= cap)

    def need(self, start: int, stop: int) -> int:
        return self.weights[stop] - self.weights[start] + max(self.facts.live_bytes[start:stop])



def _fewest_stages(ranges: _Ranges, bound: float, cap: int | None) -> int | None:
    """Greedy: each stage as long as the bounds allow; None if one step alone breaks them."""
    lows, count, stop = ranges.lowest_starts(bound, cap), 0, len(ranges.facts.order)
    while stop > 0:
        start = lows[stop]
        if not ranges.fits(start, stop, bound, cap, max(ranges.facts.live_bytes[start:stop])):
            return None
        count, stop = count + 1, start
    return count


def _best_bound(ranges: _Ranges, stages: int, cap: int | None) -> float | None:
    """The smallest slowest-stage cost of a cut into at most ``stages`` stages under ``cap``."""
    high = ranges.time[-1] * (1 + 1e-9) + 1e-12
    count = _fewest_stages(ranges, high, cap)
    if count is None or count > stages:
        return None
    low = max(ranges.facts.seconds, default=0.0)
    for _ in range(60):
        middle = (low + high) / 2
        count = _fewest_stages(ranges, middle, cap)
        if count is not None and count <= stages:
            high = middle
        else:
            low = middle
    return high


def _fewest_boundary_bytes(ranges: _Ranges, stages: int, bound: float, cap: int | None) -> list[int]:
    """Cut positions (stage starts) of the cut into exactly ``stages`` stages whose ranges stay
    within the bounds and whose cuts carry the fewest bytes: dynamic programming over stops,
    the best earlier cut found by a sliding-window minimum (both window ends only grow)."""
    steps = len(ranges.facts.order)
    lows = ranges.lowest_starts(bound, cap)
    infinite = float("inf")
    best = [0.0] + [infinite] * steps       # best[j]: stages so far ending at stop j
    back: list[list[int]] = []
    for _ in range(stages):
        current, choice, window, next_start = [infinite] * (steps + 1), [0] * (steps + 1), deque[int](), 0
        for stop in range(1, steps + 1):
            while next_start < stop:   # candidate previous stops: next_start < stop
                while window and best[window[-1]] >= best[next_start]:
                    window.pop()
                window.append(next_start)
                next_start += 1
            while window and window[0] < lows[stop]:
                window.popleft()
            if window and best[window[0]] < infinite:
                cut = ranges.facts.cut_bytes[stop] if stop < steps else 0
                current[stop], choice[stop] = best[window[0]] + cut, window[0]
        best = current
        back.append(choice)
    if best[steps] == infinite:
        return []
    starts, stop = [], steps
    for k in range(stages - 1, -1, -1):
        stop = back[k][stop]
        starts.append(stop)
    return starts[::-1]


def plan_cut(facts: StepFacts, stages: int, cap: int | None, *, require_resident: bool) -> list[int]:
    """The first step of every stage."""
    steps = len(facts.order)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= steps:
        raise OptionError(f"stages: expected an integer from 1 to the model's {steps} steps, got {stages!r}")
    ranges = _Ranges(facts)
    bound = _best_bound(ranges, stages, cap)
    if bound is None and cap is not None:
        if require_resident:
            raise _no_resident_cut(ranges, stages, cap)
        log.info("no cut into %d stages holds every stage's weights under %s: stages run memory_opt where "
                 "they must", stages, format_size(cap))
        cap = None
        bound = _best_bound(ranges, stages, None)
    assert bound is not None
    starts = _fewest_boundary_bytes(ranges, stages, bound * (1 + BALANCE_SLACK) + 1e-12, cap)
    assert len(starts) == stages, "a cut within the best bound always exists"
    return starts


def _no_resident_cut(ranges: _Ranges, stages: int, cap: int) -> PartitionError:
    steps = len(ranges.facts.order)
    fewest = _fewest_stages(ranges, math.inf, cap) or 0
    # The smallest cap for `stages` stages: the cut whose neediest stage needs least -- the
    # same greedy search with need in place of time.
    low, high = max(ranges.need(i, i + 1) for i in range(steps)), ranges.need(0, steps)
    while low < high:
        middle = (low + high) // 2
        count = _fewest_stages(ranges, math.inf, middle)
        low, high = (low, middle) if count is not None and count <= stages else (middle + 1, high)
    fewer = (f"{fewest} stages fit it" if fewest else
             f"no number of stages fits it (one step alone needs more); raise it to {format_size(low)}")
    return PartitionError(
        f"memory_limit_per_stage {format_size(cap)}: no cut into {stages} stages holds every stage's weights "
        f"resident under it; {fewer}; {stages} stages fit under {format_size(low)} ({low} bytes)",
        smallest_stages=fewest, smallest_limit_bytes=low)
