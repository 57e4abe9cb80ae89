"""The onnxruntime arena a plan's runs keep between them (rule 14 of ``segment``).

Under a cap, a tensor of 1 MiB or more is mapped when allocated and returned when freed,
so every run faults its activations in again: on MobileNetV3 at half of onnxruntime's
RSS, 2,460 page faults and 6 of a run's 12 ms. A plan that can afford it instead gives
every session one arena of onnxruntime's own, shared (``runtime/sessions.shared_arena_registered``):
its regions stay mapped between runs and the next run's tensors reuse their pages. What
that costs in RSS is not the live activations but the pages of the arena the runs have
written, so the plan counts the arena's footprint *in place of* each step's activations,
found by replaying the plan's allocations for two runs on a model of the arena.

The model is onnxruntime's BFC arena (``core/framework/bfc_arena.cc``) as the runtime
configures it (``ARENA_*`` below). Hand-written, because onnxruntime exposes no way to
ask its arena what a sequence of allocations would leave:

* a request is rounded up to 256 bytes and served from the smallest free chunk that holds
  it (the lowest address among equals), split when anything is left over (the runtime sets
  ``max_dead_bytes_per_chunk`` to 256: no padding is wasted);
* when no free chunk holds it, the arena extends by a new region: the region size starts
  at ``ARENA_INITIAL_BYTES`` and doubles with every extension (``kNextPowerOfTwo``),
  further when one request needs more. Regions are separate mappings: chunks never span two;
* a freed chunk merges with its free neighbours in its region;
* a page counts once written, and stays: the arena gives no region back while the plan's
  sessions live. A request is taken to write all its bytes, from the chunk's start;
* except in a run that builds sessions, which asks onnxruntime to shrink the arena when each
  segment's session returns (``memory.enable_memory_arena_shrinkage``): every region with
  no live chunk but the first is given back, and the next region is
  ``ARENA_INITIAL_BYTES`` again (the runtime sets ``initial_growth_chunk_size_bytes`` so).

Only tensors onnxruntime allocates live in the arena: graph inputs are the caller's, and
initializers stay outside it (``session.use_device_allocator_for_initializers``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the runtime reads the arena's settings here without the compiler's modules
    from hyperion.ir import Graph
    from hyperion.passes.liveness import Liveness

# Under a cap, glibc maps a block of this size or more on its own and gives it back when freed
# (runtime/sessions.return_freed_memory): without the arena, a run faults such tensors in anew.
MAPPED_BLOCK_BYTES = 1 << 20
# How the runtime configures the shared arena (runtime/sessions.shared_arena_registered).
ARENA_INITIAL_BYTES = 1 << 20
ARENA_MIN_ALLOCATION_BYTES = 256          # onnxruntime's kMinAllocationSize
ARENA_MAX_DEAD_BYTES_PER_CHUNK = ARENA_MIN_ALLOCATION_BYTES
# Regions are separate mappings: in the model, a gap no chunk spans lies between two.
_REGION_GAP = 1 << 50


@dataclass(frozen=True)
class Alloc:
    key: str
    nbytes: int


@dataclass(frozen=True)
class Free:
    key: str


@dataclass(frozen=True)
class SegmentEnd:
    """A segment's session has returned: a run that builds sessions shrinks the arena here."""


ArenaEvent = Alloc | Free | SegmentEnd


class _Arena:
    """Free chunks by size and by both ends; live chunks; the written pages as disjoint
    intervals, with their sum kept as they change."""

    def __init__(self) -> None:
        self.by_size: list[tuple[int, int]] = []   # (size, start) of free chunks, sorted
        self.free_at: dict[int, int] = {}          # start -> size of a free chunk
        self.free_until: dict[int, int] = {}       # end -> start of a free chunk
        self.live: dict[str, tuple[int, int]] = {}
        self.live_bytes = 0
        self.region_bytes = ARENA_INITIAL_BYTES    # the next extension's size
        self.next_region = 0
        self.regions: list[tuple[int, int]] = []   # (start, size), in address order
        self.written: list[tuple[int, int]] = []
        self.written_bytes = 0

    def alloc(self, key: str, nbytes: int) -> None:
        rounded = -(-max(nbytes, 1) // ARENA_MIN_ALLOCATION_BYTES) * ARENA_MIN_ALLOCATION_BYTES
        index = bisect.bisect_left(self.by_size, (rounded, -1))
        if index == len(self.by_size):
            self._extend(rounded)
            index = bisect.bisect_left(self.by_size, (rounded, -1))
        size, start = self.by_size[index]
        self._take(start)
        if size >= 2 * rounded or size - rounded >= ARENA_MAX_DEAD_BYTES_PER_CHUNK:
            self._give(start + rounded, size - rounded)
            size = rounded
        self.live[key] = (start, size)
        self.live_bytes += size
        self._write(start, start + max(nbytes, 1))

    def release(self, key: str) -> None:
        start, size = self.live.pop(key)
        self.live_bytes -= size
        if start + size in self.free_at:
            size += self._take(start + size)
        if start in self.free_until:
            before = self.free_until[start]
            start, size = before, self._take(before) + size
        self._give(start, size)

    def _extend(self, rounded: int) -> None:
        grown = False
        while rounded > self.region_bytes:
            self.region_bytes *= 2
            grown = True
        self._give(self.next_region, self.region_bytes)
        self.regions.append((self.next_region, self.region_bytes))
        self.next_region += self.region_bytes + _REGION_GAP
        if not grown:
            self.region_bytes *= 2

    def shrink(self) -> None:
        """Give back every region but the first that is one free chunk, and its pages."""
        kept = self.regions[:1]
        for start, size in self.regions[1:]:
            if self.free_at.get(start) != size:
                kept.append((start, size))
                continue
            self._take(start)
            first = bisect.bisect_left(self.written, (start, start))
            last = bisect.bisect_left(self.written, (start + size, start + size))
            self.written_bytes -= sum(b - a for a, b in self.written[first:last])
            del self.written[first:last]
        self.regions = kept
        self.region_bytes = ARENA_INITIAL_BYTES

    def _give(self, start: int, size: int) -> None:
        bisect.insort(self.by_size, (size, start))
        self.free_at[start] = size
        self.free_until[start + size] = start

    def _take(self, start: int) -> int:
        size = self.free_at.pop(start)
        del self.free_until[start + size]
        del self.by_size[bisect.bisect_left(self.by_size, (size, start))]
        return size

    def _write(self, first: int, last: int) -> None:
        """Add [first, last) to the written intervals, merging those it touches."""
        index = bisect.bisect_left(self.written, (first, first))
        if index > 0 and self.written[index - 1][1] >= first:
            index -= 1
        end = index
        while end < len(self.written) and self.written[end][0] <= last:
            first, last = min(first, self.written[end][0]), max(last, self.written[end][1])
            self.written_bytes -= self.written[end][1] - self.written[end][0]
            end += 1
        self.written[index:end] = [(first, last)]
        self.written_bytes += last - first


def arena_footprint(run: Sequence[ArenaEvent], runs: int = 2) -> int:
    """The bytes of the arena written over ``runs`` runs of ``run``'s allocations, each on
    the arena the one before left; a key allocated and not freed in a run (a graph output,
    held by the caller) is freed once the next run has allocated its own."""
    arena = _Arena()
    for index in range(runs):
        for event in run:
            if isinstance(event, Alloc):
                arena.alloc(f"{index}/{event.key}", event.nbytes)
            elif isinstance(event, Free):
                arena.release(f"{index}/{event.key}")
        for key in [k for k in arena.live if not k.startswith(f"{index}/")]:
            arena.release(key)
    return arena.written_bytes


def idle_bytes_at_segments(run: Sequence[ArenaEvent]) -> list[int]:
    """In the first run, which builds every session and shrinks the arena after each
    segment: per segment, the arena's written pages that no live tensor holds when its
    session is created -- beside what is live then."""
    arena = _Arena()
    idle = [0]
    for event in run:
        if isinstance(event, Alloc):
            arena.alloc(event.key, event.nbytes)
        elif isinstance(event, Free):
            arena.release(event.key)
        else:
            arena.shrink()
            idle.append(max(0, arena.written_bytes - arena.live_bytes))
    return idle[:-1]   # the last entry: after the last segment, which no session follows


def allocation_sequence(graph: Graph, liveness: Liveness, spans: Iterable[tuple[int, int]],
                        workspace: Sequence[int]) -> list[ArenaEvent]:
    """One run's arena allocations as the plan runs it: per step its outputs and then its
    kernels' workspace (freed when the step ends), the activations whose last reader it is
    freed after it -- those defined before its segment when the segment returns (rule 2).
    Graph inputs are the caller's, outside the arena; graph outputs are handed to the caller."""
    outputs_at: list[list[str]] = [[] for _ in range(liveness.num_steps)]
    deaths_at: list[list[str]] = [[] for _ in range(liveness.num_steps)]
    handed = set(graph.outputs)
    for name, interval in liveness.intervals.items():
        if interval.first < 0:
            continue
        outputs_at[interval.first].append(name)
        if name not in handed:
            deaths_at[max(interval.last, interval.first)].append(name)
    events: list[ArenaEvent] = []
    for start, stop in spans:
        held: list[str] = []
        for step in range(start, stop):
            events.extend(Alloc(name, graph.tensors[name].nbytes or 0) for name in outputs_at[step])
            if workspace[step] > 0:
                events.extend((Alloc(f"workspace {step}", workspace[step]), Free(f"workspace {step}")))
            for name in deaths_at[step]:
                if liveness.intervals[name].first >= start:
                    events.append(Free(name))
                else:
                    held.append(name)
        events.extend(Free(name) for name in held)
        events.append(SegmentEnd())
    return events
