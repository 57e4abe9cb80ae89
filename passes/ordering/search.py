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

from collections.abc import Callable
from dataclasses import dataclass

from hyperion.passes.ordering.problem import RegionProblem


@dataclass(frozen=True)
class SearchOutcome:
    order: tuple[int, ...] | None  # local order peaking below ``bound``; None: none found
    peak: int | None
    complete: bool                 # nothing was dropped: None really means none exists
    states: int                    # states stored


# key(state) -> (peak so far, resident bytes, ready bitmask, node run last, state)
_Level = dict[int | bytes, tuple[int, int, int, int, int]]
_StateKey = Callable[[int], int | bytes]


def state_key(size: int) -> _StateKey | None:
    """How states of a region of ``size`` nodes are keyed in dicts; None: by the state itself.

    Python hashes an int modulo 2**61 - 1, so the sets {k} and {k + 61} hash alike; sets of
    a wide region differ in exactly such bits, and dict lookups of bitmask states degraded
    to about 8 us each (profiled; compiling a 446-node network under a cap took over four
    minutes). Past 61 nodes the key is the state's bytes, which hash uniformly.
    """
    if size <= 61:
        return None
    width = (size + 7) // 8
    return lambda state: state.to_bytes(width, "little")


def _keyed(key: _StateKey | None, state: int) -> int | bytes:
    return state if key is None else key(state)


def frontier_search(problem: RegionProblem, bound: int, *, max_states: int | None = None,
                    width: int | None = None) -> SearchOutcome:
    """The lowest-peak order of ``problem`` peaking below ``bound`` (see the module docstring)."""
    ready = sum(1 << i for i in range(problem.size) if problem.preds[i] == 0)
    key = state_key(problem.size)
    level: _Level = {_keyed(key, 0): (0, problem.start_bytes, ready, -1, 0)}
    trail: list[dict[int | bytes, int]] = []  # per level: key -> node run last (the parent is state - bit)
    states, complete = 0, True
    for _ in range(problem.size):
        level = _expand(problem, level, bound, key)
        if not level:
            return SearchOutcome(None, None, complete, states)
        if width is not None and len(level) > width:
            kept = sorted(level.items(), key=lambda item: (item[1][0], item[1][1], item[1][4]))[:width]
            level, complete = dict(kept), False
        states += len(level)
        if max_states is not None and states > max_states:
            return SearchOutcome(None, None, False, states)
        trail.append({k: entry[3] for k, entry in level.items()})
    final = level[_keyed(key, (1 << problem.size) - 1)]
    return SearchOutcome(_walk_back(trail, key), final[0], complete, states)


def _expand(problem: RegionProblem, level: _Level, bound: int, key: _StateKey | None) -> _Level:
    step_bytes, kept_bytes, frees = problem.step_bytes, problem.kept_bytes, problem.frees
    preds, succs = problem.preds, problem.succs
    may_be_free = sum(1 << v for v in range(problem.size) if kept_bytes[v] <= problem.max_freed[v])
    following: _Level = {}
    for peak, resident, ready, _, done in level.values():
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
            after_key = after if key is None else key(after)  # inlined: the hot loop
            known = following.get(after_key)
            if known is not None:
                if known[0] > new_peak:  # same set, so same resident bytes and ready nodes
                    following[after_key] = (new_peak, known[1], known[2], v, after)
                continue
            new_resident = resident + kept_bytes[v]
            for size, others in frees[v]:
                if others & after == others:
                    new_resident -= size
            new_ready = ready ^ bit
            for w in succs[v]:
                if preds[w] & after == preds[w]:
                    new_ready |= 1 << w
            following[after_key] = (new_peak, new_resident, new_ready, v, after)
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


def _walk_back(trail: list[dict[int | bytes, int]], key: _StateKey | None) -> tuple[int, ...]:
    order: list[int] = []
    state = (1 << len(trail)) - 1
    for level in reversed(trail):
        v = level[_keyed(key, state)]
        order.append(v)
        state ^= 1 << v
    return tuple(reversed(order))
