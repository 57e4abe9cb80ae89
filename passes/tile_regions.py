"""Regions: short chains of steps run tile by tile along a free axis (``tile`` pass, rules 8-11).

A step whose working set is activations -- attention's ``[batch, heads, T, T]`` scores,
made by one MatMul and read by a Softmax -- does not fit a cap however its weights are
read. A *region* is a contiguous run of steps in the order along which one axis is free
(``tile_axes.py``): its boundary inputs that carry the axis are read one slice at a
time, the others whole; its outputs are written slice by slice into whole arrays; and
its *interior* tensors -- made and used up inside it -- only ever exist one tile at a
time. Query rows of attention are such an axis (flash-attention's chunking), so are
heads, and the rows of an elementwise chain (MCUNetV2's patches, in one dimension).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from hyperion.ir import Graph, TensorInfo
from hyperion.passes.liveness import Liveness
from hyperion.passes.memory.costs import (
    SESSION_BOOKKEEPING_ALLOWANCE_BYTES,
    SESSION_OVERHEAD_BYTES,
    session_bookkeeping_bytes,
    workspace_bytes,
)
from hyperion.passes.segment import StepCosts, single_steps_of
from hyperion.passes.tile_axes import RULES, SPATIAL_RULES, Carrier, carry
from hyperion.passes.tile_patches import (
    ROWS,
    PatchPlan,
    max_rows,
    patch_bytes,
    patch_plan,
    patch_workspace,
    staging_bytes,
)

# The longest run of steps a region spans: attention's core is 3-5 steps; longer windows
# cost planning time for nothing a cap needs.
MAX_REGION_STEPS = 8


@dataclass(frozen=True)
class Region:
    """Steps ``start`` to ``stop - 1`` of the order, run tile by tile along one free axis."""

    start: int
    stop: int
    size: int                        # the free axis' length
    bounds: tuple[int, ...]          # tile edges along it: 0, ..., size
    sliced: Mapping[str, int]        # boundary inputs read one slice at a time: their axis
    outputs: Mapping[str, int]       # tensors the region hands on, written slice by slice: their axis
    interior: Mapping[str, int]      # made and used up inside: one tile at a time
    staging_bytes: int               # tile copies of slices that are not contiguous
    patches: PatchPlan | None = None  # a spatial region: the rows of its tensors per patch (halos)
    workspace: tuple[int, ...] = ()  # a spatial region's steps: the kernel workspace of one patch

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False))

    def steps(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class _Candidate:
    """A window of the order and the axis every tensor in it carries; ``cost(n)`` the most
    its steps account with ``n`` tiles."""

    start: int                # the window of the order: its nodes, then the others in it
    stop: int
    nodes: tuple[str, ...]    # the region's, in order
    hoisted: tuple[str, ...]  # the window's other nodes: they move before the region
    axes: Mapping[str, int]
    size: int
    interior: tuple[str, ...]
    outputs: tuple[str, ...]
    sliced: tuple[str, ...]
    read: tuple[str, ...]     # activations it reads from before it (held until it returns)
    moved: tuple[str, ...]    # what the hoisted nodes make: live from before the region on
    steps: frozenset[int]     # the region's steps in the order as it was
    spatial: bool = False     # rows through Convs and pools: patches with halos (``size``: the outputs' rows)


@dataclass(frozen=True)
class _PatchFigures:
    """What a candidate's patches of one width account: the copies they stage, each
    interior tensor's bytes at its widest patch and each node's kernel workspace."""

    staging: int
    interior: Mapping[str, int]
    workspace: Mapping[str, int]


class RegionFinder:
    """Finds the regions an order needs under a budget (see :func:`find_regions`)."""

    def __init__(self, graph: Graph, liveness: Liveness, costs: StepCosts, prefetch: bool,
                 excluded: frozenset[int], spatial: bool = True) -> None:
        self.spatial = spatial
        self.graph, self.liveness, self.costs, self.prefetch = graph, liveness, costs, prefetch
        self.singles = single_steps_of(costs, prefetch)
        self.order = liveness.order
        self.step_of = {node: i for i, node in enumerate(self.order)}
        # Steps a window may span: any but the excluded (a step without a rule can still move out).
        self.spannable = [i not in excluded for i in range(len(self.order))]
        # What costing a patch plan needs, per (candidate, width): not the plans themselves,
        # whose rows per patch and tensor took YOLO-style's compile at 25% from 1.6 to 9.8 MiB
        # of Python objects, and the process's RSS up by their freed arenas' residue.
        self._figures: dict[tuple[object, ...], _PatchFigures] = {}

    def _has_rule(self, name: str) -> bool:
        node = self.graph.nodes[name]
        has_rule = node.op_type in RULES or node.op_type in SPATIAL_RULES
        return has_rule and all(self.graph.tensors[o].shape is not None for o in node.outputs if o)

    # -- candidates -----------------------------------------------------------------------
    def candidates(self, step: int) -> Iterator[_Candidate]:
        """Every window around ``step`` (within ``MAX_REGION_STEPS``) with a free axis, and
        ``step`` in its region."""
        if not self.spannable[step] or not self._has_rule(self.order[step]):
            return
        low = step
        while low > 0 and self.spannable[low - 1] and step - low + 1 < MAX_REGION_STEPS:
            low -= 1
        for start in range(low, step + 1):
            high = step + 1
            while high < len(self.order) and self.spannable[high] and high - start < MAX_REGION_STEPS:
                high += 1
            for stop in range(step + 1, high + 1):
                yield from (c for c in self._windows(start, stop) if step in c.steps)

    def _windows(self, start: int, stop: int) -> Iterator[_Candidate]:
        """The window's candidates, one per seed (an axis of an activation its first step
        reads). A step of the window that reads nothing tiled is no part of the region: it
        moves before it (rule 8: it reads nothing the region makes, all of which is tiled)."""
        window = self.order[start:stop]
        tensors = {t for n in window for t in (*self.graph.nodes[n].inputs, *self.graph.nodes[n].outputs) if t}
        claimable = frozenset(t for t in tensors if self._sliceable(self.graph.tensors[t]))
        first = self.graph.nodes[window[0]]
        if not self._has_rule(first.name):
            return
        for seed in dict.fromkeys(i for i in first.inputs if i in claimable):
            for axis, dim in enumerate(self.graph.tensors[seed].shape or ()):
                if dim == 1:
                    continue
                # Patches at batch 1: a batch streams in chunks first (and the optimal batch
                # the streaming planner computes knows nothing of patches).
                shape = self.graph.tensors[seed].shape or ()
                spatial = self.spatial and axis == ROWS and len(shape) == 4 and shape[0] == 1
                carrier = Carrier(self.graph, claimable, {seed: axis}, spatial=spatial)
                nodes, hoisted = self._carried(carrier, window)
                if nodes and nodes[-1] == window[-1]:
                    candidate = self._candidate(start, stop, tuple(nodes), tuple(hoisted), carrier.axes)
                    if candidate is not None:
                        yield candidate

    def _carried(self, carrier: Carrier, window: Sequence[str]) -> tuple[list[str], list[str]]:
        """(the region's nodes, the nodes moved before it); no nodes when the axis is not free."""
        nodes: list[str] = []
        hoisted: list[str] = []
        for name in window:
            node = self.graph.nodes[name]
            if nodes and all(carrier.axis(i) is None for i in node.inputs):
                hoisted.append(name)
            elif carry(carrier, node):
                nodes.append(name)
            else:
                return [], []
        return nodes, hoisted

    def _sliceable(self, tensor: TensorInfo) -> bool:
        return (not self.graph.is_weight(tensor.name) and self.graph.constant(tensor.name) is None
                and tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape))

    def _candidate(self, start: int, stop: int, nodes: tuple[str, ...], hoisted: tuple[str, ...],
                   axes: Mapping[str, int]) -> _Candidate | None:
        produced = {o for n in nodes for o in self.graph.nodes[n].outputs if o}
        boundary = {i for n in nodes for i in self.graph.nodes[n].inputs if i and i not in produced}
        inside = set(nodes)
        interior = tuple(sorted(n for n in produced if n not in self.graph.outputs
                                and set(self.graph.tensors[n].consumers) <= inside))
        if not interior:
            return None      # nothing exists one tile at a time: tiles would save nothing
        outputs = tuple(sorted(produced - set(interior)))
        spatial = any(self.graph.nodes[n].op_type in SPATIAL_RULES and self.graph.nodes[n].op_type not in RULES
                      for n in nodes)
        sizes = {int(self.graph.tensors[n].shape[axes[n]])  # type: ignore[index]
                 for n in (outputs if spatial else axes)}
        if len(sizes) != 1 or (spatial and any(axes.get(n) != ROWS for n in outputs)):
            return None
        sliced = tuple(sorted(n for n in boundary if n in axes))
        read = tuple(sorted(n for n in boundary if n in self.liveness.intervals))
        moved = tuple(o for n in hoisted for o in self.graph.nodes[n].outputs if o in self.liveness.intervals)
        steps = frozenset(self.step_of[n] for n in nodes)
        return _Candidate(start, stop, nodes, hoisted, dict(axes), sizes.pop(), interior, outputs, sliced, read, moved,
                          steps, spatial)

    # -- costs ----------------------------------------------------------------------------
    def tile_bytes(self, name: str, size: int, width: int) -> int:
        return -(-(self.graph.tensors[name].nbytes or 0) * width // size)

    def contiguous(self, name: str, axis: int) -> bool:
        """Slices of ``name`` along ``axis`` are contiguous: every dim before it is 1."""
        return math.prod(int(d) for d in (self.graph.tensors[name].shape or ())[:axis]) == 1

    def staging(self, candidate: _Candidate, width: int) -> int:
        if candidate.spatial:
            return self.figures(candidate, width).staging
        return sum(self.tile_bytes(n, candidate.size, width) for n in (*candidate.sliced, *candidate.outputs)
                   if not self.contiguous(n, candidate.axes[n]))

    # -- spatial patches ---------------------------------------------------------------
    def bounds(self, size: int, tiles: int) -> tuple[int, ...]:
        width = -(-size // tiles)
        count = -(-size // width)
        width = -(-size // count)    # equal widths but the last
        return (*range(0, size, width), size)

    def plan(self, candidate: _Candidate, width: int) -> PatchPlan:
        return patch_plan(self.graph, candidate.nodes, candidate.axes, candidate.outputs,
                          self.bounds(candidate.size, -(-candidate.size // width)))

    def figures(self, candidate: _Candidate, width: int) -> _PatchFigures:
        key = (candidate.start, candidate.stop, candidate.nodes, tuple(sorted(candidate.axes.items())), width)
        if key not in self._figures:
            plan = self.plan(candidate, width)
            self._figures[key] = _PatchFigures(
                staging_bytes(self.graph, plan, (*candidate.sliced, *candidate.outputs)),
                {n: patch_bytes(self.graph, plan, n) for n in candidate.interior},
                {n: self._patch_workspace(plan, n) for n in candidate.nodes})
        return self._figures[key]

    def _patch_saved(self, candidate: _Candidate, figures: _PatchFigures, step: int) -> int:
        """What a step of a spatial region accounts less than whole: its interior tensors
        and its kernel's workspace (im2col, NCHWc copies) are one patch's."""
        intervals = self.liveness.intervals
        saved = sum((self.graph.tensors[n].nbytes or 0) - figures.interior[n]
                    for n in candidate.interior if step in intervals[n])
        name = self.order[step]
        return saved + self._workspace(name) - figures.workspace[name]

    def _workspace(self, name: str) -> int:
        return workspace_bytes(self.graph, self.graph.nodes[name], weights_fed=not self.costs.normal
                               and not self.costs.prepack)

    def _patch_workspace(self, plan: PatchPlan, name: str) -> int:
        return patch_workspace(self.graph, plan, name, self._workspace(name))

    def cost(self, candidate: _Candidate, tiles: int) -> int:
        """The most a step of the region accounts with ``tiles`` tiles, as the ``segment``
        pass prices a segment of its own (rules 2, 5, 8, 12): its live activations less what
        its interior tensors save and plus what the moved steps make earlier, the inputs it
        holds until it returns, the staging, every weight of the region held, and the next
        step's loading when prefetched -- or, at its first step, its own loading."""
        width = -(-candidate.size // tiles)
        intervals, costs = self.liveness.intervals, self.costs
        staging = self.staging(candidate, width)
        figures = self.figures(candidate, width) if candidate.spatial else None
        weights = set().union(*(costs.weights[step] for step in candidate.steps))
        after = candidate.stop
        ahead = costs.loading(costs.weights[after]) if self.prefetch and after < costs.n else 0
        worst = 0
        for step in sorted(candidate.steps):
            moved = sum(self.graph.tensors[n].nbytes or 0 for n in candidate.moved if intervals[n].first > step)
            saved = (self._patch_saved(candidate, figures, step) if figures is not None else
                     sum((self.graph.tensors[n].nbytes or 0) - self.tile_bytes(n, candidate.size, width)
                         for n in candidate.interior if step in intervals[n]))
            held = sum(self.graph.tensors[n].nbytes or 0 for n in candidate.read if intervals[n].last < step)
            activations = costs.activations[step] - saved + held + moved + staging
            worst = max(worst, activations + costs.held(weights) + ahead)
            if step == min(candidate.steps):
                worst = max(worst, activations + costs.loading(weights))
        return worst

    def fewest_tiles(self, candidate: _Candidate, budget: int) -> int | None:
        """The fewest tiles (2 or more) whose cost fits ``budget``; None when none does."""
        if self.cost(candidate, candidate.size) > budget:
            return None
        low, high = 2, candidate.size
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if self.cost(candidate, middle) <= budget else (middle + 1, high)
        return low

    def tiles_for(self, candidate: _Candidate, budget: int) -> int | None:
        """The fewest tiles that fit ``budget``: for patches with room for the bookkeeping of
        the sessions kept beside the region, where patches allow."""
        room = session_bookkeeping_bytes(len(candidate.nodes))
        roomy = candidate.spatial and self.fewest_tiles(candidate, budget - room)
        return roomy or self.fewest_tiles(candidate, budget)

    def region(self, candidate: _Candidate, tiles: int) -> Region:
        bounds = self.bounds(candidate.size, tiles)
        width = bounds[1] - bounds[0]
        axes = candidate.axes
        figures = self.figures(candidate, width) if candidate.spatial else None
        return Region(candidate.start + len(candidate.hoisted), candidate.stop, candidate.size, bounds,
                      {n: axes[n] for n in candidate.sliced}, {n: axes[n] for n in candidate.outputs},
                      {n: axes[n] for n in candidate.interior}, self.staging(candidate, width),
                      self.plan(candidate, width) if candidate.spatial else None,
                      tuple(figures.workspace[name] for name in candidate.nodes) if figures is not None else ())


def find_regions(graph: Graph, liveness: Liveness, costs: StepCosts, prefetch: bool, memory_limit: int,
                 excluded: frozenset[int], splittable: frozenset[int] = frozenset(), spatial: bool = True
                 ) -> tuple[tuple[Region, ...], tuple[str, ...]]:
    """Rules 8-10: the regions that bring steps over ``memory_limit`` under it.

    ``costs``: the segmentation's per-step facts; ``excluded``: steps no
    region may hold (run by Hyperion itself, or split by their weight); ``splittable``:
    steps weight tiles can lower instead (Convs: a spatial region may hold them);
    ``spatial``: spatial patches may be cut (``tile_patches.py``). No cap below the
    most a step needs at its best (its best region with one slice per tile, or whole when
    it has none) is met anyway: regions are cut for that budget at the least. Returns the
    regions and the order with each region's window rearranged: the nodes that are no part
    of it first."""
    finder = RegionFinder(graph, liveness, costs, prefetch, excluded, spatial)
    singles = finder.singles   # every step's accounted bytes as a segment of its own
    best: dict[int, list[tuple[_Candidate, int]]] = {}
    floor = 0
    for step in sorted(range(len(singles)), key=lambda i: -singles[i]):
        if singles[step] <= max(floor, memory_limit):
            break
        if step in excluded:
            continue
        found = [(c, finder.cost(c, c.size)) for c in finder.candidates(step)]
        best[step] = found
        lowest = min((cost for _, cost in found if cost < singles[step]), default=singles[step])
        if step in splittable:
            continue            # its weight tiles may lower it further: no floor of its own
        floor = max(floor, lowest)
    budget = max(memory_limit, floor)
    regions: list[Region] = []
    order = list(liveness.order)
    taken: set[int] = set()
    peaks: list[int] = []
    over = {step for step in best if singles[step] > budget}
    for step in sorted(over):
        if step in taken:
            continue
        choices = [(-len(over & set(c.steps)), tiles, finder.staging(c, -(-c.size // tiles)), c.stop - c.start, c)
                   for c, lowest in best[step] if lowest <= budget and not taken & set(range(c.start, c.stop))
                   and (tiles := finder.tiles_for(c, budget)) is not None]
        if not choices:
            continue
        choices.sort(key=lambda choice: choice[:4])
        # The best window that leaves every later step over the budget a window of its own:
        # a window of the most steps can end just before a step no other window then reaches.
        _, tiles, _, _, chosen = next((choice for choice in choices
                                       if not _strands(choice[4], best, over, taken, budget)), choices[0])
        regions.append(finder.region(chosen, tiles))
        peaks.append(finder.cost(chosen, chosen.size))   # at its finest: what it can lower the peak to
        order[chosen.start:chosen.stop] = (*chosen.hoisted, *chosen.nodes)
        taken |= set(range(chosen.start, chosen.stop))
    # Rule 10: below what the steps need at their best (the search for the smallest cap),
    # regions must be worth their sessions: each is a segment, so a session, of its own --
    # and splits another in two -- whose bookkeeping counts at every step, beyond what the
    # segment pass's allowance holds (of which the plan spends at least one session's over
    # every step).
    apart = excluded | splittable   # weight-split steps lower themselves
    kept = [cost for i, cost in enumerate(singles) if i not in apart]
    lowered = max(kept, default=0) - max((*peaks, *(cost for i, cost in enumerate(singles)
                                                    if i not in taken and i not in apart)), default=0)
    least = session_bookkeeping_bytes(len(order))
    charged = (max(0, least + 2 * SESSION_OVERHEAD_BYTES * len(regions) - SESSION_BOOKKEEPING_ALLOWANCE_BYTES)
               - max(0, least - SESSION_BOOKKEEPING_ALLOWANCE_BYTES))
    if memory_limit < floor and lowered <= charged:
        return (), liveness.order
    return tuple(sorted(regions, key=lambda r: r.start)), tuple(order)


def _strands(chosen: _Candidate, best: Mapping[int, list[tuple[_Candidate, int]]], over: set[int],
             taken: set[int], budget: int) -> bool:
    """Whether taking ``chosen`` leaves a later step over the budget, outside its region,
    with no window of its own within the budget that overlaps no region taken."""
    blocked = taken | set(range(chosen.start, chosen.stop))
    later = (s for s in over if s > min(chosen.steps) and s not in chosen.steps and s not in taken
             and s < chosen.stop + MAX_REGION_STEPS)
    return any(not any(lowest <= budget and not blocked & set(range(c.start, c.stop)) for c, lowest in best[s])
               for s in later)


def region_accounted(graph: Graph, regions: Sequence[Region]) -> dict[str, TensorInfo]:
    """The tensor table with every interior tensor sized as its widest tile."""
    tensors = dict(graph.tensors)
    for region in regions:
        widest = max(region.widths)
        for name in region.interior:
            tensor = tensors[name]
            if region.patches is not None:   # its widest patch, halo included
                share, size = max_rows(region.patches, name), int(tensor.shape[region.interior[name]])  # type: ignore[index]
            else:
                share, size = widest, region.size
            tensors[name] = dataclasses.replace(tensor, nbytes=-(-(tensor.nbytes or 0) * share // size))
    return tensors
