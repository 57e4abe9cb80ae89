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

*Floating* nodes (they read no data, only weights or nothing, and their weights cost
nothing in the objective — a ``Constant``, a weight ``Transpose``) are moved into the
region of their first reader and left out of the forcing test: running such a node right
before its first reader never raises the peak (its own step costs at most that reader's,
and every step in between holds its output no longer), so some optimum has it there.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperion.passes.order_model import StepModel


@dataclass(frozen=True)
class Decomposition:
    regions: tuple[tuple[int, ...], ...]  # node indices; each region in its base order
    forced: bool                          # every cut is forced (see the module docstring)


def decompose(model: StepModel) -> Decomposition:
    """Regions of ``model``'s base order, cut after every sequence point."""
    floating = [model.inert[v] and not model.preds[v] and bool(model.succs[v]) for v in range(model.size)]
    spine = [v for v in range(model.size) if not floating[v]]
    if not spine:
        return Decomposition((tuple(range(model.size)),) if model.size else (), True)
    position = {v: i for i, v in enumerate(spine)}
    cuts = [i for i, cut in enumerate(_sequence_points(model, spine, position)) if cut and i + 1 < len(spine)]
    regions = [spine[start:stop] for start, stop in zip([0] + [c + 1 for c in cuts], cuts + [len(spine)])]
    forced = _cuts_forced(model, spine, floating, cuts)
    placed = _place_floating(model, floating, position, regions)
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
