"""Regions of the ordering problem as small, self-contained search problems.

A region is a run of nodes of the base order (see ``order_regions.py``). What is resident
when it starts and which tensors its nodes may free depend only on the regions before and
after it, so each region becomes a :class:`RegionProblem` in local indices (node ``i`` is
bit ``i``) that the searches work on without looking at the rest of the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hyperion.passes.ordering.model import StepModel

Frees = tuple[tuple[int, int], ...]  # (bytes, bitmask of the tensor's other readers in the region)


@dataclass(frozen=True)
class RegionProblem:
    """A region in local indices: node ``i`` is ``nodes[i]``; bit ``i`` stands for it."""

    nodes: tuple[int, ...]           # global node indices, in base order
    start_bytes: int                 # resident before the region's first step
    preds: tuple[int, ...]           # bitmask of each node's predecessors inside the region
    succs: tuple[tuple[int, ...], ...]
    step_bytes: tuple[int, ...]
    kept_bytes: tuple[int, ...]
    frees: tuple[Frees, ...]         # inputs a node may free: their readers all end in this region
    lower_bound: int                 # no order of the region peaks lower (constant excluded)
    max_freed: tuple[int, ...] = field(init=False)  # per node: the bytes it frees at most

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_freed", tuple(sum(size for size, _ in f) for f in self.frees))

    @property
    def size(self) -> int:
        return len(self.nodes)

    def key(self) -> tuple:
        """Equal for regions that are the same problem (repeated layers): one search serves all."""
        return self.start_bytes, self.preds, self.step_bytes, self.kept_bytes, self.frees

    def peak(self, order: Sequence[int]) -> int:
        return max(step_costs(self, order), default=0)

    def is_chain(self) -> bool:
        """Only one order exists: each node depends on the one before it."""
        return all(self.preds[i] >> (i - 1) & 1 for i in range(1, self.size))


class RegionSet:
    """Consecutive regions of ``model`` with, for each, the bytes it inherits, the peak of
    its base order and a lower bound of any order — computed in one sweep; the full
    :class:`RegionProblem` is built only for regions worth searching."""

    def __init__(self, model: StepModel, regions: Sequence[Sequence[int]]) -> None:
        self.model = model
        self.regions = [tuple(nodes) for nodes in regions]
        region_of = [0] * model.size
        for r, nodes in enumerate(self.regions):
            for v in nodes:
                region_of[v] = r
        self.last_region = [max(region_of[c] for c in readers) for readers in model.tensor_readers]
        self.producer_region = [-1 if p < 0 else region_of[p] for p in model.tensor_producer]
        self.start_bytes, self.base_peaks, self.lower_bounds = self._sweep()
        self.floating = model.floating()

    def __len__(self) -> int:
        return len(self.regions)

    def _sweep(self) -> tuple[list[int], list[int], list[int]]:
        """(start bytes, base-order peak, lower bound) of every region, in one pass."""
        model, last_region, producer_region = self.model, self.last_region, self.producer_region
        inherited_freed = [0] * len(self.regions)  # bytes resident at a region's start it frees
        for t, r in enumerate(last_region):
            if producer_region[t] < r:
                inherited_freed[r] += model.tensor_bytes[t]
        pending = [len(readers) for readers in model.tensor_readers]
        starts, peaks, lowers = [], [], []
        resident = model.initial_bytes
        for r, nodes in enumerate(self.regions):
            held = resident - inherited_freed[r]  # resident all through the region
            starts.append(resident)
            peak = lower = 0
            for v in nodes:
                peak = max(peak, resident + model.step_bytes[v])
                # Inputs still resident after the region are in ``held`` already: count the others.
                inputs = sum(model.tensor_bytes[t] for t in model.reads[v]
                             if not producer_region[t] < r < last_region[t])
                lower = max(lower, held + model.step_bytes[v] + inputs)
                resident += model.kept_bytes[v]
                for t in model.reads[v]:
                    pending[t] -= 1
                    if pending[t] == 0:
                        resident -= model.tensor_bytes[t]
            peaks.append(peak)
            lowers.append(lower)
        return starts, peaks, lowers

    def problem(self, r: int) -> RegionProblem:
        model, nodes = self.model, self.regions[r]
        local = {v: i for i, v in enumerate(nodes)}
        preds, succs, frees = [], [], []
        for v in nodes:
            preds.append(sum(1 << local[p] for p in model.preds[v] if p in local))
            succs.append(tuple(local[w] for w in model.succs[v] if w in local))
            frees.append(tuple((model.tensor_bytes[t], _mask(local, model.tensor_readers[t], v))
                               for t in model.reads[v] if self.last_region[t] == r))
        self._pin_floating(nodes, local, preds, succs)
        return RegionProblem(nodes, self.start_bytes[r], tuple(preds), tuple(succs),
                             tuple(model.step_bytes[v] for v in nodes),
                             tuple(model.kept_bytes[v] for v in nodes), tuple(frees), self.lower_bounds[r])

    def _pin_floating(self, nodes: Sequence[int], local: dict[int, int], preds: list[int],
                      succs: list[tuple[int, ...]]) -> None:
        """Make each floating node with one reader wait for that reader's other producers.

        Some optimal order runs a floating node right before its only reader (see
        ``order_regions.py``), so the search loses nothing by not trying it earlier; left
        free, every generated weight of a region is ready from the start, and each search
        state expands all of them (ordering a 446-node network with generated weights
        spent 27 million dict lookups).
        """
        model, floating = self.model, self.floating
        floating_bits = sum(1 << i for i, v in enumerate(nodes) if floating[v])
        for i, v in enumerate(nodes):
            if not floating[v] or len(model.succs[v]) != 1 or model.succs[v][0] not in local:
                continue
            anchors = preds[local[model.succs[v][0]]] & ~floating_bits
            preds[i] = anchors
            while anchors:
                bit = anchors & -anchors
                anchors ^= bit
                p = bit.bit_length() - 1
                succs[p] = (*succs[p], i)


def _mask(local: dict[int, int], readers: Sequence[int], reader: int) -> int:
    """Local bits of ``readers`` in the region, ``reader`` itself left out."""
    return sum(1 << local[c] for c in readers if c != reader and c in local)


def step_costs(problem: RegionProblem, order: Sequence[int]) -> list[int]:
    """The bytes of every step of ``order`` (constant excluded)."""
    return _run(problem, order)[0]


def resident_after(problem: RegionProblem, order: Sequence[int]) -> int:
    """Resident bytes after running ``order`` from the region's start."""
    return _run(problem, order)[1]


def _run(problem: RegionProblem, order: Sequence[int]) -> tuple[list[int], int]:
    """(cost of every step, resident bytes after the last)."""
    done, resident, costs = 0, problem.start_bytes, []
    for v in order:
        costs.append(resident + problem.step_bytes[v])
        done |= 1 << v
        resident += problem.kept_bytes[v]
        resident -= sum(size for size, others in problem.frees[v] if others & done == others)
    return costs, resident
