"""The C heap a plan's runs leave resident when freed blocks are kept (rule 14 of ``segment``).

With the heap kept between runs, a run's activations are carved out of the free heap the
runs before it left, so what the heap costs in RSS is not the live activations plus the
free heap, but the heap's footprint: live blocks plus the free pages between and above
them that were touched and not trimmed. That footprint depends on the order and sizes of
the allocations (blocks freed at one size leave holes another cannot fill: DenseNet-121's
ever wider concatenations grow the heap past the most activations any step holds), so it
is found by replaying the plan's allocations on a model of glibc's heap.

Hand-written because no library models glibc's allocator; this is the small part of it
that decides the footprint of blocks of a few KiB to tens of MiB:

* a request is served best-fit from the free chunks (the smallest that fits, the lowest
  address among equals), else from the top of the heap, which grows as needed; a request
  of ``MMAP_THRESHOLD_BYTES`` or more that no free chunk fits is mapped on its own and
  returned to the OS when freed;
* a freed block does not coalesce with free neighbours: onnxruntime carves small blocks
  (shapes, kernel state) from the heap right after each large one, and they outlive it, so
  two freed activations are seldom adjacent. Measured on DenseNet-121's first segment at a
  quarter of onnxruntime's RSS (its blocks of 64 KiB or more, traced with an ``LD_PRELOAD``
  shim): replayed with coalescing, its heap peaked at 12.3 MiB over two runs, without at
  19.9 and 29.7 MiB (one run, two), and the process's RSS rose 28-34 MiB over it. A block
  freed at the top rejoins the top, which glibc trims itself once more than
  ``TRIM_THRESHOLD_BYTES`` of it is free;
* a page is resident once written and stays so until trimmed. Where a free chunk is only
  partly resident, the part a request leaves is taken to hold all of its resident pages
  (at most its size): the model errs towards a larger footprint;
* after every segment the runtime trims (``malloc_trim``) when more than the kept bytes
  lie free below the top (``mallinfo2``'s ``fordblks - keepcost``): every free page is
  given back and the top released.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hyperion.ir import Graph
from hyperion.passes.liveness import Liveness

# As the runtime sets glibc when a plan keeps its heap (runtime/sessions.keep_freed_heap).
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
# posix_memalign(64) as onnxruntime's CPU allocator asks, plus glibc's chunk header.
_ALIGN_BYTES = 64


@dataclass(frozen=True)
class Alloc:
    key: str
    nbytes: int


@dataclass(frozen=True)
class Free:
    key: str


@dataclass(frozen=True)
class Trim:
    """The end of a segment: the runtime trims the free heap beyond the kept bytes."""


HeapEvent = Alloc | Free | Trim


class _Heap:
    """Free chunks below the top, by size and by address; the top; live blocks. Sums kept as
    they change: a plan of thousands of steps frees thousands of chunks."""

    def __init__(self) -> None:
        self.by_size: list[tuple[int, int]] = []    # (size, start) of free chunks, sorted
        self.resident: dict[int, int] = {}          # start -> resident bytes of that free chunk
        self.free_bytes, self.free_resident = 0, 0
        self.top_start, self.top_resident = 0, 0    # the top chunk: [top_start, brk)
        self.brk = 0
        self.live: dict[str, tuple[int, int]] = {}  # key -> (start, size); start -1: mapped alone
        self.live_bytes = 0

    def footprint(self) -> int:
        return self.live_bytes + self.top_resident + self.free_resident

    def alloc(self, key: str, nbytes: int) -> None:
        size = -(-max(nbytes, 1) // _ALIGN_BYTES) * _ALIGN_BYTES + _ALIGN_BYTES
        index = bisect.bisect_left(self.by_size, (size, -1))   # best fit, lowest address among equals
        if index < len(self.by_size):
            chunk_size, start = self.by_size[index]
            resident = self._remove(index)
            if chunk_size > size:
                self._insert(start + size, chunk_size - size, min(chunk_size - size, resident))
        elif size >= MMAP_THRESHOLD_BYTES:
            start = -1
        else:
            start = self.top_start
            top_size = self.brk - self.top_start
            self.brk = max(self.brk, start + size)
            self.top_start = start + size
            self.top_resident = min(max(0, top_size - size), self.top_resident)
        self.live[key] = (start, size)
        self.live_bytes += size

    def release(self, key: str) -> None:
        start, size = self.live.pop(key)
        self.live_bytes -= size
        if start < 0:
            return
        if start + size == self.top_start:
            self.top_start, self.top_resident = start, self.top_resident + size
            if self.brk - self.top_start > TRIM_THRESHOLD_BYTES:
                self.brk, self.top_resident = self.top_start, 0
        else:
            self._insert(start, size, size)

    def trim(self, kept_bytes: int) -> None:
        if self.free_bytes <= kept_bytes:
            return
        self.resident = dict.fromkeys(self.resident, 0)
        self.free_resident = 0
        self.brk, self.top_resident = self.top_start, 0

    def _insert(self, start: int, size: int, resident: int) -> None:
        bisect.insort(self.by_size, (size, start))
        self.resident[start] = resident
        self.free_bytes += size
        self.free_resident += resident

    def _remove(self, index: int) -> int:
        size, start = self.by_size.pop(index)
        resident = self.resident.pop(start)
        self.free_bytes -= size
        self.free_resident -= resident
        return resident


def heap_footprint(run: Sequence[HeapEvent], kept_bytes: int, runs: int = 2) -> int:
    """The most bytes the heap holds resident over ``runs`` runs of ``run``'s allocations,
    each starting from the heap the one before left; a key allocated and not freed in a
    run (a graph output) is freed once the next run has allocated its own."""
    heap = _Heap()
    peak = 0
    for index in range(runs):
        for event in run:
            if isinstance(event, Alloc):
                heap.alloc(f"{index}/{event.key}", event.nbytes)
                peak = max(peak, heap.footprint())
            elif isinstance(event, Free):
                heap.release(f"{index}/{event.key}")
            else:
                heap.trim(kept_bytes)
        for key in [k for k in heap.live if not k.startswith(f"{index}/")]:
            heap.release(key)
    return peak


def allocation_sequence(graph: Graph, liveness: Liveness, spans: Iterable[tuple[int, int]],
                        workspace: Sequence[int]) -> list[HeapEvent]:
    """One run's heap allocations as the plan runs it: per step its outputs and then its
    kernels' workspace (freed when the step ends), the activations whose last reader it is
    freed after it -- those defined before its segment when the segment returns (rule 2) --
    and a trim after every segment. Graph inputs are the caller's, allocated before the
    run; graph outputs are handed to the caller."""
    outputs_at: list[list[str]] = [[] for _ in range(liveness.num_steps)]
    deaths_at: list[list[str]] = [[] for _ in range(liveness.num_steps)]
    handed = set(graph.outputs)
    for name, interval in liveness.intervals.items():
        if interval.first < 0:
            continue
        outputs_at[interval.first].append(name)
        if name not in handed:
            deaths_at[max(interval.last, interval.first)].append(name)
    events: list[HeapEvent] = []
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
        events.append(Trim())
    return events
