"""Arena placement for ``plan_memory``: best-fit offsets for tensors with lifetimes.

Placing a tensor needs the tensors already placed whose lifetimes overlap its own. The
naive scan over every placed tensor makes planning quadratic (minutes at 20,000 nodes),
so placed tensors are indexed by time in buckets of :data:`BUCKET_STEPS` steps: a query
reads only the buckets its interval touches, and each tensor is reported once, from the
first touched bucket that holds it. Most tensors live a few steps, so a placement costs
about the number of tensors live around it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from hyperion.passes.liveness import Interval

BUCKET_STEPS = 16

SortKey = Callable[[str, Interval, int], tuple]
# Placement orders tried in turn; the first whose arena equals the live peak ends the search.
# Largest first is TFLite's and XNNPACK's greedy-by-size; the others win on some irregular graphs.
ORDERS: dict[str, SortKey] = {
    "largest_first": lambda name, interval, size: (-size, interval.first, name),
    "last_use_first": lambda name, interval, size: (-interval.last, -size, name),
    "longest_first": lambda name, interval, size: (interval.first - interval.last, -size, name),
    "first_use_first": lambda name, interval, size: (interval.first, -size, name),
}
PROMOTE_MAX_TENSORS = 256  # graphs this small also get the promotion search
PROMOTE_TRIES = 64         # re-placements the promotion search may spend


def largest_first(name: str, interval: Interval, size: int) -> tuple:
    return ORDERS["largest_first"](name, interval, size)


class _TimeIndex:
    """Placed (first, last, offset, end) records, bucketed by the steps they span."""

    def __init__(self) -> None:
        self.buckets: dict[int, list[tuple[int, int, int, int]]] = {}

    def add(self, first: int, last: int, offset: int, end: int) -> None:
        record = (first, last, offset, end)
        for bucket in range(first // BUCKET_STEPS, last // BUCKET_STEPS + 1):
            self.buckets.setdefault(bucket, []).append(record)

    def overlapping(self, first: int, last: int) -> list[tuple[int, int]]:
        """(offset, end) of every placed record whose lifetime overlaps [first, last]."""
        low = first // BUCKET_STEPS
        found = []
        for bucket in range(low, last // BUCKET_STEPS + 1):
            for r_first, r_last, offset, end in self.buckets.get(bucket, ()):
                # Report a record from the first bucket of the query that holds it only.
                if r_first <= last and first <= r_last and max(r_first // BUCKET_STEPS, low) == bucket:
                    found.append((offset, end))
        return found


def greedy_by_size(intervals: Mapping[str, Interval], sizes: Mapping[str, int],
                   key: SortKey = largest_first) -> dict[str, int]:
    """Offsets such that tensors with overlapping intervals never share bytes.

    Tensors are placed in ``key`` order, each at the start of the smallest gap between
    overlapping placed tensors that holds it, or above them all when none does.
    """
    return place(intervals, sizes, sorted(intervals, key=lambda n: key(n, intervals[n], sizes[n])))


def place(intervals: Mapping[str, Interval], sizes: Mapping[str, int],
          order: Sequence[str]) -> dict[str, int]:
    """Best-fit offsets, placing tensors in ``order``."""
    index = _TimeIndex()
    offsets: dict[str, int] = {}
    for name in order:
        size, interval = sizes[name], intervals[name]
        first, last = max(interval.first, 0), max(interval.last, 0)
        offset = _best_fit(sorted(index.overlapping(first, last)), size)
        offsets[name] = offset
        index.add(first, last, offset, offset + size)
    return offsets


def arena_bytes(offsets: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    return max((offset + sizes[name] for name, offset in offsets.items()), default=0)


def best_placement(intervals: Mapping[str, Interval], sizes: Mapping[str, int],
                   floor: int) -> tuple[str, dict[str, int], int]:
    """(strategy, offsets, arena bytes) of the smallest arena found; ``floor`` (the live
    peak) ends the search early, since no arena is smaller."""
    best: tuple[str, list[str], dict[str, int], int] | None = None
    for name, key in ORDERS.items():
        order = sorted(intervals, key=lambda n: key(n, intervals[n], sizes[n]))
        offsets = place(intervals, sizes, order)
        arena = arena_bytes(offsets, sizes)
        if best is None or arena < best[3]:
            best = (name, order, offsets, arena)
        if arena <= floor:
            break
    if best is None:
        return "largest_first", {}, 0
    name, order, offsets, arena = best
    if arena > floor and len(order) <= PROMOTE_MAX_TENSORS:
        promoted, offsets, arena = _promote(intervals, sizes, order, offsets, arena, floor)
        name = f"{name}+promote" if promoted else name
    return name, offsets, arena


def _promote(intervals: Mapping[str, Interval], sizes: Mapping[str, int], order: list[str],
             offsets: dict[str, int], arena: int, floor: int) -> tuple[bool, dict[str, int], int]:
    """Move a tensor that reaches the top of the arena earlier in the placement order, one
    position at a time, keeping the first move that shrinks the arena; repeat while tries last."""
    tries, promoted = 0, False
    while tries < PROMOTE_TRIES and arena > floor:
        position = {n: i for i, n in enumerate(order)}
        top = min((n for n, off in offsets.items() if off + sizes[n] == arena), key=position.__getitem__)
        i = position[top]
        for j in range(i - 1, -1, -1):
            tries += 1
            candidate = order[:j] + [top] + order[j:i] + order[i + 1:]
            candidate_offsets = place(intervals, sizes, candidate)
            candidate_arena = arena_bytes(candidate_offsets, sizes)
            if candidate_arena < arena:
                order, offsets, arena, promoted = candidate, candidate_offsets, candidate_arena, True
                break
            if tries >= PROMOTE_TRIES:
                break
        else:
            break
    return promoted, offsets, arena


def _best_fit(busy: list[tuple[int, int]], size: int) -> int:
    """The start of the smallest gap in ``busy`` (sorted (offset, end)) that holds ``size``."""
    best_offset, best_gap, cursor = None, None, 0
    for start, end in busy:
        gap = start - cursor
        if gap >= size and (best_gap is None or gap < best_gap):
            best_offset, best_gap = cursor, gap
        cursor = max(cursor, end)
    return cursor if best_offset is None else best_offset


def live_peak(intervals: Mapping[str, Interval], sizes: Mapping[str, int], num_steps: int) -> int:
    """The largest total size of the tensors live at one step (both interval ends included)."""
    delta = [0] * (num_steps + 2)
    for name, interval in intervals.items():
        delta[max(interval.first, 0)] += sizes[name]
        delta[max(interval.last, 0) + 1] -= sizes[name]
    peak = running = 0
    for change in delta:
        running += change
        peak = max(peak, running)
    return peak


def arena_conflict(intervals: Mapping[str, Interval], sizes: Mapping[str, int],
                   offsets: Mapping[str, int]) -> tuple[str, str] | None:
    """Two tensors live at a common step whose bytes overlap, or None: the check that a
    placement is sound. A sweep by first step compares each tensor with those still live."""
    live: list[tuple[int, int, int, str]] = []   # (last, offset, end, name)
    for name in sorted(offsets, key=lambda n: (max(intervals[n].first, 0), n)):
        first, last = max(intervals[name].first, 0), max(intervals[name].last, 0)
        offset, end = offsets[name], offsets[name] + sizes[name]
        live = [record for record in live if record[0] >= first]
        for _, other_offset, other_end, other in live:
            if offset < other_end and other_offset < end:
                return other, name
        live.append((last, offset, end, name))
    return None
