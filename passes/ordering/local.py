"""Local improvement of a region's order: exact re-search of windows around its peak.

Past the exact search's budget, an order (the base order or the beam's) is improved by
re-solving a window of consecutive steps around the step that sets the peak, everything
before and after held fixed, exactly (``frontier_search`` on the window). A window is
replaced only when its peak drops below the order's peak, so each accepted move lowers
the peak or the number of steps at it: the loop ends, and never makes the order worse.
Windows are tried centred on the peak, then ending and starting at it; when no window of
one size improves the peak, the next larger size is tried, until the state budget runs out.
"""

from __future__ import annotations

from collections.abc import Sequence

from hyperion.passes.ordering.problem import RegionProblem, resident_after, step_costs
from hyperion.passes.ordering.search import frontier_search

# Window sizes tried in turn: small windows are cheap, larger ones escape their local optima.
WINDOWS = (12, 16, 24, 32, 48)
WINDOW_MAX_STATES = 20_000  # one window search; past it the window counts as not improvable


def window_problem(problem: RegionProblem, order: Sequence[int], start: int, stop: int) -> RegionProblem:
    """The sub-problem of reordering ``order[start:stop]`` with the rest of ``order`` fixed."""
    window = order[start:stop]
    done = sum(1 << v for v in order[:start])
    inside = sum(1 << v for v in window)
    local = {v: i for i, v in enumerate(window)}

    def remap(mask: int) -> int:
        return sum(1 << i for v, i in local.items() if mask >> v & 1)

    resident = resident_after(problem, order[:start])
    frees = tuple(tuple((size, remap(others & inside)) for size, others in problem.frees[v]
                        if others & ~(done | inside) == 0)
                  for v in window)
    return RegionProblem(tuple(problem.nodes[v] for v in window), resident,
                         tuple(remap(problem.preds[v] & inside) for v in window),
                         tuple(tuple(local[w] for w in problem.succs[v] if w in local) for v in window),
                         tuple(problem.step_bytes[v] for v in window),
                         tuple(problem.kept_bytes[v] for v in window), frees, lower_bound=0)


def improve_locally(problem: RegionProblem, order: Sequence[int], max_states: int,
                    windows: Sequence[int] = WINDOWS) -> tuple[tuple[int, ...], int]:
    """(improved order, states spent) — see the module docstring."""
    order, spent = tuple(order), 0
    for window in windows:
        order, spent = _improve(problem, order, window, max_states, spent)
        if spent >= max_states or window >= len(order):
            break
    return order, spent


def _improve(problem: RegionProblem, order: tuple[int, ...], window: int, max_states: int,
             spent: int) -> tuple[tuple[int, ...], int]:
    while spent < max_states:
        costs = step_costs(problem, order)
        peak = max(costs, default=0)
        at = costs.index(peak)
        for start in _window_starts(at, window, len(order)):
            stop = min(len(order), start + window)
            limit = min(max_states - spent, WINDOW_MAX_STATES)
            outcome = frontier_search(window_problem(problem, order, start, stop), peak, max_states=limit)
            spent += outcome.states
            if outcome.order is not None:
                window_nodes = order[start:stop]
                order = order[:start] + tuple(window_nodes[i] for i in outcome.order) + order[stop:]
                break
        else:
            return order, spent
    return order, spent


def _window_starts(at: int, window: int, size: int) -> list[int]:
    """Window starts that put step ``at`` in the middle, at the end, at the start."""
    last = max(0, size - window)
    return list(dict.fromkeys(min(last, max(0, s)) for s in (at - window // 2, at - window + 1, at)))
