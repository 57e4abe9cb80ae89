"""Search one region for a low-peak order: exact dynamic programming over sets, or beam search.

The search follows SERENITY (Ahn et al., MLSys 2020): a state is the set ``S`` of the
region's nodes already run (a bitmask); what is resident after ``S`` depends on ``S`` alone
(see ``passes/order_model.py``), so the best peak of any order that runs exactly ``S`` first
is a function of ``S``, and states are expanded level by level (|S| = 0, 1, 2, ...) keeping
only the best way to reach each set. States whose peak reaches ``bound`` are dropped: they
cannot beat an order already known.

* exact: every state is kept; the search gives up (``complete=False``) once it has stored
  ``max_states`` states, so its work is bounded by a count, not a clock — the result does
  not depend on the machine;
* beam: each level keeps only the ``width`` states with the lowest (peak, resident bytes):
  linear in the region's size and deterministic, but not a proof of optimality.

A *free move* prunes both: see :func:`_free_move`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperion.passes.order_problem import RegionProblem


@dataclass(frozen=True)
class SearchOutcome:
    order: tuple[int, ...] | None  # local order peaking below ``bound``; None: none found
    peak: int | None
    complete: bool                 # nothing was dropped: None really means none exists
    states: int                    # states stored


# state -> (peak so far, resident bytes, ready bitmask, node run last)
_Level = dict[int, tuple[int, int, int, int]]


def frontier_search(problem: RegionProblem, bound: int, *, max_states: int | None = None,
                    width: int | None = None) -> SearchOutcome:
    """The lowest-peak order of ``problem`` peaking below ``bound`` (see the module docstring)."""
    ready = sum(1 << i for i in range(problem.size) if problem.preds[i] == 0)
    level: _Level = {0: (0, problem.start_bytes, ready, -1)}
    trail: list[dict[int, int]] = []  # per level: state -> node run last (its parent is state - bit)
    states, complete = 0, True
    for _ in range(problem.size):
        level = _expand(problem, level, bound)
        if not level:
            return SearchOutcome(None, None, complete, states)
        if width is not None and len(level) > width:
            kept = sorted(level.items(), key=lambda item: (item[1][0], item[1][1], item[0]))[:width]
            level, complete = dict(kept), False
        states += len(level)
        if max_states is not None and states > max_states:
            return SearchOutcome(None, None, False, states)
        trail.append({state: entry[3] for state, entry in level.items()})
    final = level[(1 << problem.size) - 1]
    return SearchOutcome(_walk_back(trail), final[0], complete, states)


def _expand(problem: RegionProblem, level: _Level, bound: int) -> _Level:
    step_bytes, kept_bytes, frees = problem.step_bytes, problem.kept_bytes, problem.frees
    preds, succs = problem.preds, problem.succs
    may_be_free = sum(1 << v for v in range(problem.size) if kept_bytes[v] <= problem.max_freed[v])
    following: _Level = {}
    for done, (peak, resident, ready, _) in level.items():
        pending = _free_move(problem, done, peak, resident, ready & may_be_free) or ready
        while pending:
            bit = pending & -pending
            pending ^= bit
            v = bit.bit_length() - 1
            cost = resident + step_bytes[v]
            new_peak = cost if cost > peak else peak
            if new_peak >= bound:
                continue
            after = done | bit
            known = following.get(after)
            if known is not None:
                if known[0] > new_peak:  # same set, so same resident bytes and ready nodes
                    following[after] = (new_peak, known[1], known[2], v)
                continue
            new_resident = resident + kept_bytes[v]
            for size, others in frees[v]:
                if others & after == others:
                    new_resident -= size
            new_ready = ready ^ bit
            for w in succs[v]:
                if preds[w] & after == preds[w]:
                    new_ready |= 1 << w
            following[after] = (new_peak, new_resident, new_ready, v)
    return following


def _free_move(problem: RegionProblem, done: int, peak: int, resident: int, candidates: int) -> int:
    """A ready node that can run next without loss, as a bit, or 0.

    A node whose step does not raise the peak so far and that frees at least what it
    keeps can run first: moved to the front of any completion, its step costs nothing
    new, and every step it jumps over holds no more bytes than before (it frees its
    last-read inputs earlier; inputs others still read are freed by their last reader
    instead). Expanding only it prunes the search without losing the optimum.
    """
    while candidates:
        bit = candidates & -candidates
        candidates ^= bit
        v = bit.bit_length() - 1
        if resident + problem.step_bytes[v] > peak:
            continue
        after = done | bit
        freed = 0
        for size, others in problem.frees[v]:
            if others & after == others:
                freed += size
        if problem.kept_bytes[v] <= freed:
            return bit
    return 0


def _walk_back(trail: list[dict[int, int]]) -> tuple[int, ...]:
    order: list[int] = []
    state = (1 << len(trail)) - 1
    for level in reversed(trail):
        v = level[state]
        order.append(v)
        state ^= 1 << v
    return tuple(reversed(order))
