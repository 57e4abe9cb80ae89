"""Split the ordering problem at sequence points into regions ordered one by one.

A node ``v`` is a *sequence point* of the base order when no edge jumps over it: no edge
``u→w`` has ``u`` before ``v`` and ``w`` after it. Cutting the base order right after every
sequence point gives regions that can be reordered independently: any order inside each
region, concatenated, is a topological order. What is resident across a region from
outside it does not depend on the order inside, so a region is a small problem of its own.

The cut after ``v`` is *forced* — every topological order runs the nodes before the cut
first — when, besides no edge jumping over ``v``, no node before ``v`` is a sink (it could
drift later) and no node after ``v`` is a source (it could drift earlier). When every cut is
forced, the best order of the whole graph is the best order of each region, concatenated,
and its peak the largest region optimum.

*Floating* nodes — they read no data (only weights, or nothing), every output they make is
read later, and their own weights cost no more than any reader's step (a ``Constant``, a
weight ``Transpose``, a ``ConstantOfShape`` generating a weight) — are moved into the region
of their first reader and left out of the forcing test. Running such a node ``s`` right
before its first reader ``c`` never raises the peak: its step costs
``resident + outputs(s) + weights(s)``, at most ``c``'s step
``resident + outputs(s) + outputs(c) + weights(c)``, and every step in between holds its
outputs no longer. So some optimum has it there. (A dead output would break this: it
counts at ``s``'s own step only, which may be cheaper early.) The region searches use the
same fact: a floating node with one reader waits for that reader's other producers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hyperion.passes.ordering.local import improve_locally
from hyperion.passes.ordering.model import StepModel
from hyperion.passes.ordering.problem import RegionProblem, RegionSet
from hyperion.passes.ordering.search import SearchOutcome, frontier_search


@dataclass(frozen=True)
class Decomposition:
    regions: tuple[tuple[int, ...], ...]  # node indices; each region in its base order
    forced: bool                          # every cut is forced (see the module docstring)


def decompose(model: StepModel, max_region_nodes: int | None = None) -> Decomposition:
    """Regions of ``model``'s base order, cut after every sequence point.

    A region longer than ``max_region_nodes`` is cut into consecutive chunks of that many
    nodes (cuts that are not forced: the search stays fast, but proves nothing).
    """
    floating = model.floating()
    spine = [v for v in range(model.size) if not floating[v]]
    if not spine:
        return Decomposition((tuple(range(model.size)),) if model.size else (), True)
    position = {v: i for i, v in enumerate(spine)}
    points = _sequence_points(model, spine, position)
    cuts = [i for i, cut in enumerate(points) if cut and i + 1 < len(spine)]
    bounds = [0] + [c + 1 for c in cuts] + [len(spine)]
    regions = [spine[start:stop] for start, stop in itertools.pairwise(bounds)]
    forced = _cuts_forced(model, spine, floating, cuts)
    placed = _place_floating(model, floating, position, regions)
    if max_region_nodes is not None and any(len(r) > max_region_nodes for r in placed):
        placed = [r[i:i + max_region_nodes] for r in placed for i in range(0, len(r), max_region_nodes)]
        forced = False
    return Decomposition(tuple(tuple(r) for r in placed), forced)


def _sequence_points(model: StepModel, spine: list[int], position: dict[int, int]) -> list[bool]:
    """``cuts[i]``: no edge jumps over spine position ``i`` (a difference array over edges)."""
    jumps = [0] * (len(spine) + 1)
    for u in spine:
        for w in model.succs[u]:
            start, stop = position[u] + 1, position[w]
            if start < stop:
                jumps[start] += 1
                jumps[stop] -= 1
    cuts, running = [], 0
    for i in range(len(spine)):
        running += jumps[i]
        cuts.append(running == 0)
    return cuts


def _cuts_forced(model: StepModel, spine: list[int], floating: list[bool], cuts: list[int]) -> bool:
    """For every cut ``i``: no sink sits before spine position ``i`` and no source after it.

    The last spine node is always a sink and the first always a source, so both lists
    are non-empty.
    """
    if not cuts:
        return True
    sinks = [i for i, v in enumerate(spine) if not model.succs[v]]
    sources = [i for i, v in enumerate(spine) if all(floating[p] for p in model.preds[v])]
    return sinks[0] >= cuts[-1] and sources[-1] <= cuts[0]


def _place_floating(model: StepModel, floating: list[bool], position: dict[int, int],
                    regions: list[list[int]]) -> list[list[int]]:
    """Put every floating node right before its first reader, in that reader's region."""
    before: dict[int, list[int]] = {}
    for v in range(model.size):
        if floating[v]:
            first = min(model.succs[v], key=position.__getitem__)
            before.setdefault(first, []).append(v)
    if not before:
        return regions
    return [[f for v in nodes for f in (*before.get(v, ()), v)] for nodes in regions]


# -- solving the regions ---------------------------------------------------------------------
@dataclass(frozen=True)
class SearchBudget:
    """Work limits of the ordering search, counted in states so results never depend on speed.

    An exact search first gets ``quick_states`` (enough for most regions); past that, a
    beam search of ``beam_width`` and local improvement (``local_states`` from each of two
    starts) give an order whose peak bounds a second exact search of ``max_states`` (its
    memory: about 80 bytes a state). ``total_states`` (exact and local) and
    ``total_beam_states`` (width × nodes) bound all searches of one graph: the time.
    A graph of at most ``whole_graph_nodes`` nodes whose cuts are not forced is also
    searched whole (``max_states``) to prove its optimum. Regions longer than
    ``max_region_nodes`` are searched in chunks of that many nodes (bitmask states of
    thousands of bits would make every step slow).
    """

    quick_states: int = 10_000
    max_states: int = 100_000
    local_states: int = 30_000
    total_states: int = 250_000
    beam_width: int = 32
    total_beam_states: int = 200_000
    whole_graph_nodes: int = 96
    max_region_nodes: int = 256


@dataclass(frozen=True)
class RegionsOutcome:
    order: tuple[int, ...]
    peak: int                  # constant bytes excluded
    optimal: bool              # ``peak`` is the optimum of the whole graph
    regions: int
    forced: bool               # every cut is forced: regions can be solved one by one
    exhausted: bool            # an exact search of some region ran out of budget


Solution = tuple[tuple[int, ...], int, bool]  # (local order, its peak, proven optimal for the region)


@dataclass
class _Solver:
    budget: SearchBudget
    states_left: int
    beam_left: int
    cache: dict[tuple, Solution]
    exhausted: bool = False

    def solve(self, problem: RegionProblem, upper: int, settled: int) -> Solution:
        """The region's best order found, below ``upper`` if it can be."""
        cached = self.cache.get(problem.key())
        if cached is not None and (cached[2] or cached[1] <= settled):
            return cached
        result = self._search(problem, upper, settled)
        self.cache[problem.key()] = result
        return result

    def _search(self, problem: RegionProblem, upper: int, settled: int) -> Solution:
        base = tuple(range(problem.size))
        quick = self._exact(problem, upper, self.budget.quick_states)
        if quick.complete:
            return (quick.order, quick.peak, True) if quick.order else (base, upper, True)
        order, peak = self._heuristic(problem, base, upper)
        if peak <= settled:
            return order, peak, False  # no region can go below what the graph needs anyway
        full = self._exact(problem, peak, self.budget.max_states)
        if full.complete:
            return (full.order, full.peak, True) if full.order else (order, peak, True)
        self.exhausted = True
        return order, peak, False

    def _exact(self, problem: RegionProblem, bound: int, limit: int) -> SearchOutcome:
        outcome = frontier_search(problem, bound, max_states=min(limit, self.states_left))
        self.states_left = max(0, self.states_left - outcome.states)
        return outcome

    def _heuristic(self, problem: RegionProblem, base: tuple[int, ...],
                   upper: int) -> tuple[tuple[int, ...], int]:
        """The best of: base order and beam order, each improved locally."""
        width = max(1, min(self.budget.beam_width, self.beam_left // max(problem.size, 1)))
        self.beam_left = max(0, self.beam_left - width * problem.size)
        beam = frontier_search(problem, upper, width=width).order
        best, best_peak = base, upper
        for start in (beam, base) if beam is not None else (base,):
            improved, spent = improve_locally(problem, start, min(self.budget.local_states, self.states_left))
            self.states_left = max(0, self.states_left - spent)
            peak = problem.peak(improved)
            if peak < best_peak:
                best, best_peak = improved, peak
        return best, best_peak


def order_by_regions(model: StepModel, budget: SearchBudget) -> RegionsOutcome:
    """Order every region, most demanding first, until none can lower the graph's peak.

    ``settled`` is a proven lower bound of the optimum (when every cut is forced): the
    largest region lower bound or proven region optimum so far. A region whose order
    already peaks at or below it cannot lower the graph's peak and keeps its base order.
    """
    decomposition = decompose(model, budget.max_region_nodes)
    regions = RegionSet(model, decomposition.regions)
    chosen: dict[int, tuple[int, ...]] = {}
    peaks = list(regions.base_peaks)
    settled = max(regions.lower_bounds, default=0)
    solver = _Solver(budget, budget.total_states, budget.total_beam_states, {})
    for r in sorted(range(len(regions)), key=lambda r: (-peaks[r], r)):
        if peaks[r] <= settled:
            break
        problem = regions.problem(r)
        if peaks[r] <= problem.lower_bound or problem.is_chain():
            settled = max(settled, peaks[r])  # the base order is this region's optimum
            continue
        local, peaks[r], proven = solver.solve(problem, peaks[r], settled)
        chosen[r] = tuple(problem.nodes[i] for i in local)
        if proven:
            settled = max(settled, peaks[r])
    order = tuple(v for r, nodes in enumerate(regions.regions) for v in chosen.get(r, nodes))
    peak = max(peaks, default=0)
    forced = decomposition.forced
    return RegionsOutcome(order, peak, forced and peak <= settled, len(regions), forced, solver.exhausted)


def exact_order(model: StepModel, incumbent: RegionsOutcome,
                budget: SearchBudget) -> tuple[tuple[int, ...], int] | None:
    """(optimal order, its peak) of the whole graph searched as one region, or None past the
    budget; the incumbent's order when nothing beats it. Peaks exclude constant bytes."""
    problem = RegionSet(model, [range(model.size)]).problem(0)
    outcome = frontier_search(problem, incumbent.peak,
                              max_states=min(budget.max_states, budget.total_states))
    if not outcome.complete:
        return None
    return (outcome.order, outcome.peak) if outcome.order else (incumbent.order, incumbent.peak)
