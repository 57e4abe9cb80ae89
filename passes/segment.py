"""segment: group consecutive steps into segments, each one onnxruntime session (see :class:`SegmentPass`)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hyperion.errors import MemoryLimitError
from hyperion.ir import SMALL_TENSOR_BYTES, ExecutionMode, Graph
from hyperion.passes._infra import Pass, PassResult, ensure, require
from hyperion.passes.liveness import Liveness, activation_live_bytes
from hyperion.passes.memory.costs import (
    SESSION_BOOKKEEPING_ALLOWANCE_BYTES,
    relayout_bytes,
    resident_bytes,
    rewrite_bytes,
    session_bookkeeping_bytes,
    workspace_bytes,
)
from hyperion.passes.memory.ort_arena import (
    ArenaEvent,
    allocation_sequence,
    arena_footprint,
    idle_bytes_at_segments,
)
from hyperion.passes.program import Program
from hyperion.units import format_size


@dataclass(frozen=True)
class Span:
    """Steps ``start`` to ``stop - 1`` of the order."""

    start: int
    stop: int


@dataclass(frozen=True)
class Segmentation:
    spans: tuple[Span, ...]
    step_bytes: tuple[int, ...]           # accounted bytes per step, everything above included
    held_bytes: tuple[int, ...] = ()      # per segment: what its live session holds for its weights
    loading_bytes: tuple[int, ...] = ()   # per segment: the most while its session is created
    cached: tuple[int, ...] = ()          # segments whose sessions stay alive across runs
    prefetch: bool = False
    cyclic_prefetch: bool = False         # the last segment prefetches segment 0 for the next run
    pinned_bytes: int = 0
    prepack_weights: bool = True          # sessions pre-pack weights (False: held at their own size)
    relaid: tuple[bool, ...] = ()         # per segment: its fed weights packed and re-laid, mapped (rule 13)
    kept_heap_bytes: int = 0              # the shared arena's footprint, kept between runs (rule 14)
    rebuilt: tuple[int, ...] = ()         # segments whose sessions are built on every run (rule 9)

    @property
    def peak_bytes(self) -> int:
        return max(self.step_bytes, default=0)


@dataclass(frozen=True)
class SegmentPass(Pass):
    """Group consecutive steps into segments, each one onnxruntime session.

    Rules:

    1. with no cap, the whole model is one segment (unless ``max_segment_steps``
       asks for smaller ones, e.g. one node per segment);
    2. a segment holds its inputs until it returns: a tensor defined before the
       segment and last read inside it stays accounted until the segment's last step;
    3. a session holds its weights as :mod:`hyperion.passes.memory.costs` says: packed
       copies for pre-packed weights, the plain bytes for the others; while it is
       being created it also holds the original of the weight being packed and the
       optimizer's copies of its convolutions' weights (``costs.rewrite_bytes``). With
       ``prepack_weights=False`` sessions pack nothing: every weight is held at its
       own size, mapped, and creating a session holds nothing more;
    4. ``normal`` mode: every weight is resident all the time, and the first step
       of each segment also pays for its session's creation;
    5. ``memory_opt`` mode (and streaming, planned as memory_opt): a segment's session
       exists only while the segment runs; with ``prefetch`` the next segment's session
       is created while the current one computes, so every step of a segment also
       accounts the next segment's creation (after the last segment: segment 0's, for
       the next run, when that fits); the first segment (every segment without
       prefetch) accounts its own creation at its first step;
    6. the weight cache: in ``memory_opt`` mode, sessions of segments kept alive
       across runs, chosen in order while their held bytes (plus their bookkeeping,
       unless rule 9 counts it already) fit ``weight_cache_bytes`` (``None``: any
       amount) and every step stays under the cap; a cached session counts at every
       step, and in a fed plan its kernels' workspace is that of constant weights;
    7. ``pinned_bytes`` are held for the whole run outside the graph (streaming:
       the whole batch's inputs and outputs) and count at every step; under a cap without
       them, graph inputs of ``CALLER_INPUT_BYTES`` or more count at every step too: the caller
       holds them for the whole run, though the plan has no more use for them (the YOLO-style
       detector's 4.7 MiB image, read by its first steps, is in the process's RSS when its
       last Concat peaks); smaller ones are left to the promise's allowance;
    8. a step's kernel workspace (``costs.workspace_bytes``: onnxruntime's blocked copies
       around convolutions and pools, ConvTranspose's column buffer) counts with its
       activations;
    9. every session that persists across runs whatever the cache (all of them in a
       normal or fed plan; in a packed plan, those holding no large weight; and the
       one-node sessions the runtime keeps for a tiled step: one per tile relaid, one per
       tile width fed, ``Tiling.kept_sessions``) counts its bookkeeping
       (``costs.session_bookkeeping_bytes``) at every step, beyond the first
       ``SESSION_BOOKKEEPING_ALLOWANCE_BYTES`` that the RSS promise's allowance holds.
       When that bookkeeping does not fit (under a cap, in a plan other than normal), the
       sessions of some segments are *rebuilt*: built on every run and dropped after their
       segment, fewest nodes first (the cheapest to build), until the plan fits -- on the
       segments as grown, else on segments grown under the whole cap. A rebuilt session's
       bookkeeping counts at its own steps only, beside the kept sessions'; its creation is
       counted there already (rules 4-5). Runs then build sessions: slower, but the cap holds;
       never in the weight cache, and such a plan keeps no arena (rule 14);
    10. segments are grown greedily while every constraint above holds; a step that
       does not fit even as its own segment raises
       :class:`~hyperion.errors.MemoryLimitError` naming it, the bytes it needs and
       the smallest cap that works (that cap always admits a plan);
    11. a step the ``tile`` pass runs outside onnxruntime (a row gather, a tiled step)
       is a segment of its own, and loads what it reads when it runs: never prefetched,
       so no step before it accounts its loading;
    12. a region of the ``tile`` pass (steps run tile by tile along a free axis) is
       exactly one segment, whatever else; its steps also account its staging (tile
       copies of slices that are not contiguous);
    13. ``relayout`` (fed plans): onnxruntime runs a segment fastest when its weights are
       constants of its session -- MatMul and Gemm weights packed once into MLAS's panels,
       convolution weights re-laid in NCHWc blocks with a following BatchNormalization
       folded in. A fed segment is therefore built once through onnxruntime's optimizer
       with its weights as constants, the packed and re-laid copies written to a file
       its persistent session maps; after every run the runtime drops the mapped pages.
       Such a *relaid* segment holds each weight as onnxruntime holds a constant one
       (``costs.resident_bytes``: its packed size), its creation holds that, the
       optimizer's copies of its convolutions' weights (``costs.relayout_bytes``) and
       the largest weight twice (``costs.rewrite_bytes``), and its convolutions run on
       NCHWc copies of their input and output (rule 8's constant-weight workspace). A
       segment is relaid when its first step fits alone with that cost; it then grows
       only while its creation fits. One whose first step does not fit is fed plainly,
       so relayout never raises the smallest cap: single steps are checked without it.
       A region's segment is never relaid (its session runs tile by tile, fed as built).
    14. the arena: under a cap, a tensor of 1 MiB or more is mapped when allocated and
       returned when freed, so each run faults its large activations in again (on
       MobileNetV3 at half of onnxruntime's RSS, 6 of a run's 12 ms). When every session
       persists and no step is run by Hyperion itself (tiles, row gathers, regions), the
       sessions may instead share one onnxruntime arena that keeps its pages between runs
       (``kept_heap_bytes``: its footprint). A run's activations are then carved out of
       it, so the plan counts, at every step, the arena's footprint *in place of* the
       step's own activations (the graph inputs its segment holds, and the caller's,
       beside it): the pages it has written over two runs of the plan's allocations on a
       model of onnxruntime's arena
       (:mod:`hyperion.passes.memory.ort_arena`; DenseNet-121's ever wider concatenations:
       1.6x its high-water; MobileNetV3 1.3x). The runs that build sessions give the
       arena's free regions back after every segment, so a session's creation is charged,
       beside what is live then, the pages of the arena no live tensor holds (its first
       region, never given back, and the rest of regions that hold a live tensor),
       simulated too. It is kept when that fits the cap
       as segmented, or with segments grown again under the cap less what the arena adds
       (as long as they relay every weight the first ones did). A model re-planned at run
       time keeps none (``keep_heap=False``): its prefix and its rest are two plans.

    Writes ``program.segmentation``. Postcondition: the segments cover every step in
    order, and the peak is at most the cap.
    """

    name: ClassVar[str] = "segment"
    max_segment_steps: int | None = None
    prefetch: bool = True
    weight_cache_bytes: int | None = None
    pinned_bytes: int = 0
    prepack_weights: bool = True
    relayout: bool = True
    keep_heap: bool = True

    def requires(self, program: Program) -> None:
        require(program.liveness is not None, self.name, "liveness (the 'liveness' pass)")

    def call(self, program: Program) -> PassResult:
        assert program.liveness is not None
        tiling = program.tiling
        isolated = tiling.isolated_steps(program.liveness.order) if tiling else frozenset()
        regions = tuple((r.start, r.stop) for r in tiling.regions) if tiling else ()
        segmentation = segment(program.graph, program.liveness, program.planning_mode, program.memory_limit,
                               self.max_segment_steps, prefetch=self.prefetch,
                               weight_cache_bytes=self.weight_cache_bytes, pinned_bytes=self.pinned_bytes,
                               prepack_weights=self.prepack_weights, isolated=isolated, regions=regions,
                               staging=tiling.region_staging(program.graph, program.liveness.order,
                                                             not self.prepack_weights) if tiling else {},
                               relayout=self.relayout, keep_heap=self.keep_heap,
                               tile_sessions=tiling.kept_sessions(program.liveness.order, self.prepack_weights)
                               if tiling else {})
        modified = segmentation != program.segmentation
        program.segmentation = segmentation
        return PassResult(program, modified)

    def ensures(self, program: Program) -> None:
        segmentation, liveness = program.segmentation, program.liveness
        ensure(segmentation is not None and liveness is not None, self.name, "no segmentation was recorded")
        assert segmentation is not None and liveness is not None
        bounds = [0] + [s.stop for s in segmentation.spans]
        starts = [s.start for s in segmentation.spans] + [liveness.num_steps]
        ensure(bounds == starts and all(s.start < s.stop for s in segmentation.spans)
               and len(segmentation.step_bytes) == liveness.num_steps, self.name,
               "the segments do not cover every step once, in order")
        limit = program.memory_limit
        ensure(limit is None or segmentation.peak_bytes <= limit, self.name,
               f"peak {segmentation.peak_bytes} bytes exceeds the cap of {limit} bytes")


class _Costs:
    """Per-step facts the segmentation needs: live activations, deaths, weights."""

    def __init__(self, graph: Graph, liveness: Liveness, normal: bool, prepack: bool = True,
                 isolated: frozenset[int] = frozenset(), regions: tuple[tuple[int, int], ...] = (),
                 staging: Mapping[int, int] | None = None, relayout: bool = False,
                 tile_sessions: Mapping[int, tuple[int, bool]] | None = None, caller_inputs: bool = False) -> None:
        self.graph, self.liveness, self.normal, self.prepack = graph, liveness, normal, prepack
        self.isolated = isolated   # steps Hyperion runs itself: segments of their own, loaded when they run
        # Of those, tiled steps whose one-node sessions the runtime keeps across runs: how
        # many, and whether relaid.
        self.tile_sessions = dict(tile_sessions or {})
        # Regions are segments of their own: a step joins its region's segment, and a
        # region's first step and the step after its last start new ones.
        self.joins = frozenset(step for start, stop in regions for step in range(start + 1, stop))
        self.region_starts = frozenset(start for start, _ in regions)
        self.breaks = (isolated | {step + 1 for step in isolated}
                       | {start for start, _ in regions} | {stop for _, stop in regions})
        self.n = liveness.num_steps
        # Kernel workspace counts as activation bytes of its step. A fed plan's sessions
        # are handed their large weights, except the weight cache's, which hold them
        # as initializers, and relaid segments, whose convolutions run as if they did:
        # ``cached_workspace`` is what holding a step's weights as constants adds.
        fed = not normal and not prepack
        nodes = [graph.nodes[n] for n in liveness.order]
        workspace = [workspace_bytes(graph, node, weights_fed=fed) for node in nodes]
        self.cached_workspace = ([workspace_bytes(graph, node, weights_fed=False) - w
                                  for node, w in zip(nodes, workspace, strict=True)] if fed else [0] * self.n)
        staged = staging or {}
        self.live = activation_live_bytes(graph, liveness)   # tensors alone, graph inputs included
        # Graph inputs: (last reader, bytes); the large ones the caller holds (rule 7), per step.
        self.inputs = [(interval.last, graph.tensors[name].nbytes or 0)
                       for name, interval in liveness.intervals.items() if interval.first < 0]
        self.caller_held = _caller_held_inputs(graph, liveness) if caller_inputs else [0] * self.n
        self.caller_inputs = caller_inputs
        self.activations = [a + w + staged.get(step, 0) + h for step, (a, w, h) in
                            enumerate(zip(self.live, workspace, self.caller_held, strict=True))]
        self.deaths: list[list[str]] = [[] for _ in range(self.n)]
        for name, interval in liveness.intervals.items():
            if 0 <= interval.last < self.n:
                self.deaths[interval.last].append(name)
        self.weights = [set(graph.weights_of(node)) for node in liveness.order]
        names = {w for ws in self.weights for w in ws}
        self.plain = {w: graph.tensors[w].nbytes or 0 for w in names}
        # Unpacked, a session holds each weight where it is mapped, at its own size.
        self.resident = {w: resident_bytes(graph, w) for w in names} if prepack else self.plain
        self.all_held = sum(resident_bytes(graph, t.name) if prepack else t.nbytes or 0
                            for t in graph.tensors.values() if graph.is_weight(t.name))
        # What onnxruntime's optimizer adds while it rewrites a convolution's weight, per
        # weight (costs.relayout_bytes): whenever a packed or normal plan builds a session
        # holding it, in a fed plan only for relaid segments (rule 13). A step Hyperion runs
        # itself (tiles) hands its one-node sessions tiles as inputs: nothing of it is rewritten.
        tiled = {w for step in isolated for w in self.weights[step]}
        self.rewritten = {node.inputs[1]: copy for node in nodes
                          if (copy := relayout_bytes(graph, node)) and node.inputs[1] not in tiled
                          and self.plain[node.inputs[1]] > SMALL_TENSOR_BYTES}
        # Rule 13: in a fed plan every weight a session of onnxruntime reads can be relaid,
        # and is then held as a constant one is (packed).
        self.relaid_weights = (frozenset(w for w in names - tiled if self.plain[w] > SMALL_TENSOR_BYTES)
                               if fed and relayout else frozenset())
        self.relaid_resident = {w: resident_bytes(graph, w) for w in self.relaid_weights}

    def activation(self, step: int, relaid: bool) -> int:
        """Live activation bytes at ``step``, with its kernels' workspace; a relaid
        segment's convolutions run on NCHWc copies, as with constant weights."""
        return self.activations[step] + (self.cached_workspace[step] if relaid else 0)

    def relaid_copy(self, weights: set[str]) -> int:
        """What onnxruntime's optimizer adds while it packs and re-lays these weights (rule 13):
        the convolutions' copies and the largest weight twice."""
        relaid = weights & self.relaid_weights
        return rewrite_bytes((self.plain[w], self.rewritten.get(w, 0)) for w in relaid)

    def rewriting(self, weights: set[str] | frozenset[str]) -> int:
        return rewrite_bytes((self.plain[w], self.rewritten[w]) for w in weights if w in self.rewritten)

    def prefetched(self, step: int) -> bool:
        """Whether the segment starting at ``step`` is prefetched: it exists, and is not run by
        Hyperion itself (an isolated step loads what it reads when it runs)."""
        return step < self.n and step not in self.isolated

    def held(self, weights: set[str], relaid: bool = False) -> int:
        """What a live session holds for ``weights``; relaid, as constants (rule 13)."""
        if relaid:
            return sum(self.relaid_resident.get(w, self.resident[w]) for w in weights)
        return sum(self.resident[w] for w in weights)

    def loading(self, weights: set[str], relaid: bool = False) -> int:
        if relaid:
            return self.held(weights, True) + self.relaid_copy(weights)
        return self.held(weights) + self.transient(weights)

    def transient(self, weights: set[str]) -> int:
        """Held only while a session with these weights as constants is created: the
        original of the weight being packed, and the optimizer's copies of its convolutions'
        weights (costs.rewrite_bytes) -- packing off or not, every session of a normal or
        packed plan holds its weights as initializers and has its convolutions rewritten."""
        packing = max((self.plain[w] for w in weights), default=0) if self.prepack else 0
        return packing + (self.rewriting(weights) if self.prepack or self.normal else 0)

    def persistent(self, span: _GrowingSpan | Span) -> bool:
        """Whether the span's session outlives its run whatever the weight cache: every
        session of a normal or fed plan, and one holding no large weight. A step Hyperion
        runs itself (``isolated``) is no session of onnxruntime's: the tile sessions the
        runtime keeps for it are counted apart (``tile_sessions``)."""
        if span.start in self.isolated:
            return False
        if self.normal or not self.prepack:
            return True
        return all(self.plain[w] <= SMALL_TENSOR_BYTES for step in range(span.start, span.stop)
                   for w in self.weights[step])

    def bookkeeping(self, spans: list[_GrowingSpan]) -> int:
        """What the sessions that persist across runs hold besides weights, beyond the
        share of the RSS promise's fixed allowance kept for it."""
        return max(0, self.session_bytes(spans) - SESSION_BOOKKEEPING_ALLOWANCE_BYTES)

    def session_bytes(self, spans: Iterable[_GrowingSpan], tiles: bool = True) -> int:
        """The bookkeeping of the persistent sessions of ``spans`` (and of the tile sessions kept)."""
        total = sum(session_bookkeeping_bytes(s.stop - s.start, self.relaid(s)) for s in spans if self.persistent(s))
        if tiles:
            total += sum(count * session_bookkeeping_bytes(1, relaid) for count, relaid in self.tile_sessions.values())
        return total

    def relaid(self, span: _GrowingSpan) -> bool:
        """Whether the span's session is relaid (rule 13), as ``segment`` records it."""
        return span.relaid and bool(span.weights & self.relaid_weights)

    def newly_held(self, step: int, first: int) -> int:
        """Bytes of inputs defined before ``first`` whose last reader is ``step``."""
        return sum(self.graph.tensors[t].nbytes or 0 for t in self.deaths[step]
                   if self.liveness.intervals[t].first < first)


# Graph inputs from this size on count while the caller holds them (rule 7). Below it they
# are left to the 32 MiB allowance: a few small feeds sit in its slack, and small models'
# plans stay as they were.
CALLER_INPUT_BYTES = 1 << 20


def _caller_held_inputs(graph: Graph, liveness: Liveness) -> list[int]:
    """Per step, the bytes of graph inputs the plan no longer holds but the caller does (rule 7)."""
    held = [0] * liveness.num_steps
    for name in graph.inputs:
        size, interval = graph.tensors[name].nbytes or 0, liveness.intervals.get(name)
        if size < CALLER_INPUT_BYTES:
            continue
        for step in range(liveness.num_steps):
            if interval is None or step not in interval:
                held[step] += size
    return held


class _GrowingSpan:
    """A segment being grown one step at a time: its activation profile and weights."""

    def __init__(self, costs: _Costs, start: int, relaid: bool = False) -> None:
        self.costs, self.start, self.stop = costs, start, start + 1
        self.relaid = relaid   # rule 13: built through onnxruntime's optimizer, then fed re-laid weights
        self.held_inputs = 0
        self.step_activation = [costs.activation(start, relaid)]
        self.activation_peak = self.step_activation[0]
        self.weights = set(costs.weights[start])

    def _grown_activations(self, step: int) -> tuple[int, int]:
        held = self.held_inputs + self.costs.newly_held(step - 1, self.start)
        return max(self.activation_peak, self.costs.activation(step, self.relaid) + held), held

    @property
    def loading(self) -> int:
        return self.costs.loading(self.weights, self.relaid)

    def grown(self, step: int) -> tuple[int, int, set[str]]:
        """(activation peak, held input bytes, weights) with ``step`` added."""
        peak, held = self._grown_activations(step)
        return peak, held, self.weights | self.costs.weights[step]

    def extend(self, step: int) -> None:
        # In place: a fresh union per step would make an uncapped model quadratic.
        self.activation_peak, self.held_inputs = self._grown_activations(step)
        self.weights |= self.costs.weights[step]
        self.step_activation.append(self.costs.activation(step, self.relaid) + self.held_inputs)
        self.stop = step + 1


@dataclass(frozen=True)
class _Rules:
    budget: int | None        # the cap minus pinned bytes
    prefetch: bool
    max_segment_steps: int | None

    def fits(self, costs: _Costs, span: _GrowingSpan, step: int, previous: _GrowingSpan | None) -> bool:
        if step in costs.joins:
            return True
        if step in costs.breaks:
            return False
        if self.max_segment_steps is not None and step - span.start >= self.max_segment_steps:
            return False
        if self.budget is None:
            return True
        peak, _, weights = span.grown(step)
        first_activation = span.step_activation[0]
        if costs.normal:
            return (peak + costs.all_held <= self.budget
                    and first_activation + costs.all_held + costs.transient(weights) <= self.budget)
        loading = costs.loading(weights, span.relaid)
        next_loading = (costs.loading(costs.weights[step + 1], self.relaid(costs, step + 1))
                        if self.prefetch and costs.prefetched(step + 1) else 0)
        if peak + costs.held(weights, span.relaid) + next_loading > self.budget:
            return False
        if self.prefetch and previous is not None:   # this segment is created while the previous runs
            return (previous.activation_peak + costs.held(previous.weights, previous.relaid) + loading
                    <= self.budget)
        return first_activation + loading <= self.budget

    def relaid(self, costs: _Costs, start: int) -> bool:
        """Whether a segment starting at ``start`` is relaid (rule 13): when that step fits
        alone with the optimizer's copy of its weights and its constant-weight workspace."""
        if not costs.relaid_weights or start in costs.region_starts:
            return False
        return self.budget is None or (costs.activation(start, True)
                                       + costs.loading(costs.weights[start], True) <= self.budget)


def segment(graph: Graph, liveness: Liveness, mode: ExecutionMode, memory_limit: int | None,
            max_segment_steps: int | None = None, *, prefetch: bool = True,
            weight_cache_bytes: int | None = None, pinned_bytes: int = 0,
            prepack_weights: bool = True, isolated: frozenset[int] = frozenset(),
            regions: tuple[tuple[int, int], ...] = (), staging: Mapping[int, int] | None = None,
            relayout: bool = False, tile_sessions: Mapping[int, tuple[int, bool]] | None = None,
            keep_heap: bool = False) -> Segmentation:
    if liveness.num_steps == 0:
        return Segmentation((), ())
    normal = mode is ExecutionMode.NORMAL
    prefetch = prefetch and not normal
    costs = _Costs(graph, liveness, normal, prepack_weights, isolated, regions, staging, relayout, tile_sessions,
                   caller_inputs=memory_limit is not None and not pinned_bytes)
    _check_single_steps(costs, mode, memory_limit, prefetch, max_segment_steps, pinned_bytes)
    layout = _planned_layout(costs, memory_limit, prefetch, max_segment_steps, pinned_bytes)
    if memory_limit is not None and not layout.fits(memory_limit):
        _refuse_for_bookkeeping(costs, mode, memory_limit, prefetch, max_segment_steps, pinned_bytes)
    _settle(layout, memory_limit, prefetch)
    cached = _cached(layout, normal, memory_limit, weight_cache_bytes)
    arena = 0
    if keep_heap and memory_limit is not None and layout.may_keep_arena():
        arena, layout, cached = _keeping_arena(costs, layout, cached, memory_limit, normal, prefetch,
                                               max_segment_steps, pinned_bytes, weight_cache_bytes)
    spans = layout.spans
    return Segmentation(tuple(Span(s.start, s.stop) for s in spans),
                        tuple(layout.step_bytes(cached, arena)),
                        layout.held, layout.loading, cached, prefetch, layout.cyclic, pinned_bytes, prepack_weights,
                        tuple(costs.relaid(s) and i not in cached for i, s in enumerate(spans)), arena,
                        layout.rebuilt)


def _settle(layout: _Layout, memory_limit: int | None, prefetch: bool) -> None:
    """Whether the last segment prefetches segment 0 for the next run: when that fits."""
    layout.cyclic = prefetch and len(layout.spans) > 1 and (memory_limit is None or layout.fits_cyclic(memory_limit))


def _cached(layout: _Layout, normal: bool, memory_limit: int | None, weight_cache_bytes: int | None
            ) -> tuple[int, ...]:
    """Every segment in normal mode; else the weight cache's choice."""
    return tuple(range(len(layout.spans))) if normal else layout.choose_cache(memory_limit, weight_cache_bytes)


def _keeping_arena(costs: _Costs, layout: _Layout, cached: tuple[int, ...], memory_limit: int, normal: bool,
                   prefetch: bool, max_segment_steps: int | None, pinned_bytes: int, weight_cache_bytes: int | None
                   ) -> tuple[int, _Layout, tuple[int, ...]]:
    """Rule 14: (the kept arena's footprint, layout, cached segments). The
    layout as grown keeps the arena when that fits; else segments are grown once more under the
    cap less what the arena adds to a step beyond its own activations (smaller segments hold
    fewer weights beside it), if they still relay every weight; else the arena goes back (0, 0)
    and the layout stays as grown."""
    arena = layout.arena_footprint()
    if layout.fits_keeping_arena(cached, arena, memory_limit):
        return arena, layout, cached
    for lowered in sorted({memory_limit - (arena - layout.activation_high_water()), memory_limit - arena},
                          reverse=True):
        if lowered <= 0:
            continue
        regrown = _grown_layout(costs, lowered, prefetch, max_segment_steps, pinned_bytes)
        # Smaller segments must not cost relayout: a plainly fed segment's GEMMs run unpacked.
        if regrown.fits(lowered) and regrown.relaid_weights() >= layout.relaid_weights():
            _settle(regrown, lowered, prefetch)
            regrown_cached = _cached(regrown, normal, lowered, weight_cache_bytes)
            regrown_arena = regrown.arena_footprint()
            if regrown.fits_keeping_arena(regrown_cached, regrown_arena, memory_limit):
                return regrown_arena, regrown, regrown_cached
    return 0, layout, cached


# Simulated, the arena's footprint is found for this many runs after the first (which builds
# the sessions and gives free regions back): each starts from the arena the one before left.
ARENA_SIMULATED_RUNS = 2


def _grown_layout(costs: _Costs, memory_limit: int | None, prefetch: bool, max_segment_steps: int | None,
                  pinned_bytes: int, reserve_bookkeeping: bool = True) -> _Layout:
    """Segments grown under the cap less the kept sessions' bookkeeping (``reserve_bookkeeping``),
    or under the whole cap."""
    budget = None if memory_limit is None else memory_limit - pinned_bytes
    spans = (_grow_with_bookkeeping(costs, budget, prefetch, max_segment_steps)[0] if reserve_bookkeeping
             else _grow(costs, _Rules(budget, prefetch, max_segment_steps)))
    held = tuple(costs.held(s.weights, s.relaid) for s in spans)
    loading = tuple(s.loading for s in spans)
    return _Layout(costs, spans, held, loading, prefetch, pinned_bytes)


def _planned_layout(costs: _Costs, memory_limit: int | None, prefetch: bool, max_segment_steps: int | None,
                    pinned_bytes: int) -> _Layout:
    """The layout rule 9 settles on: every session kept when their bookkeeping fits; else
    some rebuilt on every run, on the segments as grown or on segments grown under the whole
    cap, whichever rebuilds fewer nodes (then has fewer segments); the grown layout (not
    fitting) when neither fits."""
    layout = _grown_layout(costs, memory_limit, prefetch, max_segment_steps, pinned_bytes)
    if memory_limit is None or layout.fits(memory_limit) or costs.normal:
        return layout
    whole_cap = _grown_layout(costs, memory_limit, prefetch, max_segment_steps, pinned_bytes, False)
    rebuilding = [r for r in (_rebuilding(g, memory_limit) for g in (whole_cap, layout)) if r is not None]
    return min(rebuilding, key=lambda r: (r.rebuilt_nodes(), len(r.spans)), default=layout)


def _rebuilding(layout: _Layout, memory_limit: int) -> _Layout | None:
    """``layout`` with the fewest-node sessions rebuilt on every run until it fits (None: it
    does not, even with every session rebuilt). Bookkeeping adds the same to every step of a
    segment, so each segment's peak without it is computed once; rebuilding one more session
    never raises a segment's bookkeeping, so the fewest sessions are found by bisection."""
    spans, own = layout.spans, layout.own_bytes
    base = [peak - layout.pinned(i) for i, peak in enumerate(layout.segment_peaks())]
    order = sorted((i for i, s in enumerate(spans) if own[i]), key=lambda i: (spans[i].stop - spans[i].start, i))
    shared = layout.kept_sessions_bytes

    def fits(count: int) -> bool:
        rebuilt = set(order[:count])
        kept = shared - sum(own[i] for i in rebuilt)
        return all(b + layout.pinned_bytes + max(0, kept + (own[i] if i in rebuilt else 0)
                                                 - SESSION_BOOKKEEPING_ALLOWANCE_BYTES) <= memory_limit
                   for i, b in enumerate(base))

    if not order or not fits(len(order)):
        return None
    low, high = 0, len(order)   # fits(high); fits(0) is the layout as grown, which does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return layout.with_rebuilt(tuple(sorted(order[:high])))


def _smallest_limit(costs: _Costs, prefetch: bool, max_segment_steps: int | None, pinned_bytes: int,
                    refused: int, candidate: int) -> tuple[int, int]:
    """The smallest cap above ``refused`` whose plan fits for this order, and the
    bookkeeping of the sessions kept across runs in that plan; ``candidate`` is a
    first guess. More sessions need more bookkeeping, so the cap is found by
    bisection on the plan itself: more room never makes a plan worse. (Callers pass
    the most one step needs alone as ``refused + 1``: less may fit once steps are
    grouped, but under another cap the order pass may choose another order.)"""
    def fits(limit: int) -> bool:
        return _planned_layout(costs, limit, prefetch, max_segment_steps, pinned_bytes).fits(limit)

    low, high = refused, max(candidate, refused + 1)
    while not fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high, _planned_layout(costs, high, prefetch, max_segment_steps, pinned_bytes).bookkeeping


def _refuse_for_bookkeeping(costs: _Costs, mode: ExecutionMode, memory_limit: int, prefetch: bool,
                            max_segment_steps: int | None, pinned_bytes: int) -> None:
    """Every step fits alone, but not beside the bookkeeping of the sessions kept across runs."""
    smallest, bookkeeping = _smallest_limit(costs, prefetch, max_segment_steps, pinned_bytes, memory_limit,
                                           memory_limit + 1)
    raise MemoryLimitError(
        f"memory_limit {format_size(memory_limit)} ({memory_limit} bytes) cannot be met in {mode.value} mode: "
        f"every step fits alone, but not beside the bookkeeping of the onnxruntime sessions kept across "
        f"runs ({format_size(bookkeeping)} at the smallest limit); the smallest limit that works in this mode is "
        f"{smallest} bytes", needed_bytes=smallest, smallest_limit_bytes=smallest)


def _grow_with_bookkeeping(costs: _Costs, budget: int | None, prefetch: bool,
                           max_segment_steps: int | None) -> tuple[list[_GrowingSpan], int]:
    """Spans grown under the budget less the bookkeeping of the sessions that persist,
    and that bookkeeping. Smaller spans mean more sessions, so the reserve is raised
    until it covers the spans grown under it (a few rounds: it grows by a session's
    bookkeeping per extra span)."""
    reserve = 0
    for _ in range(_BOOKKEEPING_ROUNDS):
        spans = _grow(costs, _Rules(None if budget is None else budget - reserve, prefetch, max_segment_steps))
        needed = costs.bookkeeping(spans)
        if budget is None or needed <= reserve:
            return spans, needed
        reserve = needed
    return spans, needed


_BOOKKEEPING_ROUNDS = 6


def _grow(costs: _Costs, rules: _Rules) -> list[_GrowingSpan]:
    spans: list[_GrowingSpan] = []
    current = _GrowingSpan(costs, 0, rules.relaid(costs, 0))
    for step in range(1, costs.n):
        if rules.fits(costs, current, step, spans[-1] if spans else None):
            current.extend(step)
            continue
        spans.append(current)
        current = _GrowingSpan(costs, step, rules.relaid(costs, step))
    spans.append(current)
    return spans


class _Layout:
    """Accounted bytes per step of a fixed segmentation, for a choice of cached segments."""

    def __init__(self, costs: _Costs, spans: list[_GrowingSpan], held: tuple[int, ...],
                 loading: tuple[int, ...], prefetch: bool, pinned_bytes: int, rebuilt: tuple[int, ...] = ()) -> None:
        self.costs, self.spans, self.held, self.loading = costs, spans, held, loading
        self.prefetch, self.pinned_bytes, self.cyclic, self.rebuilt = prefetch, pinned_bytes, False, rebuilt
        # Kept sessions' bookkeeping counts at every step, like pinned bytes; a rebuilt
        # session's beside it at its own steps (rule 9).
        self.own_bytes = [costs.session_bytes([s], tiles=False) for s in spans]   # 0: not persistent
        self.kept_sessions_bytes = (costs.session_bytes([], tiles=True)
                                    + sum(b for i, b in enumerate(self.own_bytes) if i not in rebuilt))
        self.bookkeeping = max(0, self.kept_sessions_bytes - SESSION_BOOKKEEPING_ALLOWANCE_BYTES)

    def rebuilt_nodes(self) -> int:
        return sum(self.spans[i].stop - self.spans[i].start for i in self.rebuilt)

    def with_rebuilt(self, rebuilt: tuple[int, ...]) -> _Layout:
        return _Layout(self.costs, self.spans, self.held, self.loading, self.prefetch, self.pinned_bytes, rebuilt)

    def pinned(self, index: int) -> int:
        """Held at every step of segment ``index`` outside the graph: pinned bytes and the
        sessions' bookkeeping beyond the allowance."""
        own = self.own_bytes[index] if index in self.rebuilt else 0
        return self.pinned_bytes + max(0, self.kept_sessions_bytes + own - SESSION_BOOKKEEPING_ALLOWANCE_BYTES)

    def segment_peaks(self) -> list[int]:
        """Per segment, the most over its steps and its session's creation, no session cached."""
        return [max(*steps, creation) for steps, creation in map(self._base, range(len(self.spans)))]

    def fits(self, memory_limit: int) -> bool:
        """Whether the plan without any cached session stays under ``memory_limit``."""
        return max(self.step_bytes(()), default=0) <= memory_limit

    def next_of(self, index: int) -> int | None:
        if index + 1 < len(self.spans):
            return index + 1
        return 0 if self.cyclic else None

    def _base(self, index: int) -> tuple[list[int], int]:
        """(bytes of each step, bytes while the session is created) without cached sessions."""
        span, costs = self.spans[index], self.costs
        pinned = self.pinned(index)
        if costs.normal:
            steps = [a + costs.all_held + pinned for a in span.step_activation]
            return steps, span.step_activation[0] + costs.all_held + costs.transient(span.weights) + pinned
        nxt = self.next_of(index)
        prefetching = self.prefetch and nxt is not None and costs.prefetched(self.spans[nxt].start)
        ahead = self.loading[nxt] if prefetching else 0  # type: ignore[index]
        steps = [a + self.held[index] + ahead + pinned for a in span.step_activation]
        created_alone = index == 0 or not self.prefetch or span.start in costs.isolated
        creation = span.step_activation[0] + self.loading[index] + pinned if created_alone else 0
        return steps, creation

    def fits_cyclic(self, memory_limit: int | None) -> bool:
        self.cyclic = True
        steps, _ = self._base(len(self.spans) - 1)
        self.cyclic = False
        return memory_limit is None or max(steps) <= memory_limit

    def _cache_cost(self, index: int) -> int:
        span = self.spans[index]
        own = 0 if self.costs.persistent(span) else session_bookkeeping_bytes(span.stop - span.start)
        return self.held[index] + own

    def _cached_workspace(self, index: int) -> list[int]:
        """Per step of segment ``index``: the workspace its kernels add once its session
        holds its weights as initializers (cached, in a fed plan); at its first step, the
        blocked copies of its Conv weights made while that session is created."""
        span = self.spans[index]
        if span.relaid:   # its activations and its loading count it already
            return [0] * (span.stop - span.start)
        workspace = list(self.costs.cached_workspace[span.start:span.stop])
        if not (self.costs.prepack or self.costs.normal):   # counted in every creation of those already
            workspace[0] += self.costs.rewriting(span.weights)
        return workspace

    def choose_cache(self, memory_limit: int | None, weight_cache_bytes: int | None) -> tuple[int, ...]:
        """Segments in order, each kept if it fits the cache budget and the cap."""
        k = len(self.spans)
        bases = [self._base(i) for i in range(k)]
        limit = np.inf if memory_limit is None else memory_limit
        step_slack = np.array([limit - max(steps) for steps, _ in bases], dtype=float)
        creation_slack = np.array([limit - creation for _, creation in bases], dtype=float)
        nexts = [self.next_of(i) for i in range(k)]
        cached: list[int] = []
        used = 0
        for c in range(k):
            cost = self._cache_cost(c)
            if self.held[c] == 0 or c in self.rebuilt or (weight_cache_bytes is not None
                                                           and used + cost > weight_cache_bytes):
                continue
            # A cached session counts everywhere but in its own segment and while it is prefetched.
            touched_steps = np.array([i != c and nexts[i] != c for i in range(k)])
            touched_creation = np.arange(k) != c
            steps = bases[c][0]
            own = max(b + w for b, w in zip(steps, self._cached_workspace(c), strict=True)) - max(steps)
            if (step_slack[touched_steps] < cost).any() or (creation_slack[touched_creation] < cost).any() \
                    or step_slack[c] < own:
                continue
            step_slack[c] -= own
            step_slack[touched_steps] -= cost
            creation_slack[touched_creation] -= cost
            cached.append(c)
            used += cost
        return tuple(cached)

    def may_keep_arena(self) -> bool:
        """Rule 14: whether runs after the first build nothing and Hyperion runs no step itself."""
        costs = self.costs
        return (not costs.isolated and not costs.region_starts and not self.rebuilt
                and all(costs.persistent(s) for s in self.spans))

    def relaid_weights(self) -> set[str]:
        """The weights of relaid segments (rule 13)."""
        return {w for s in self.spans if s.relaid for w in s.weights & self.costs.relaid_weights}

    def fits_keeping_arena(self, cached: tuple[int, ...], arena: int, memory_limit: int) -> bool:
        return max(self.step_bytes(cached, arena), default=0) <= memory_limit

    def activation_high_water(self) -> int:
        """The most activations, with workspace, that any step holds."""
        return max((max(span.step_activation) for span in self.spans), default=0)

    @functools.cached_property
    def arena_idle_at_creation(self) -> list[int]:
        """Per segment, the arena's written pages no live tensor holds when the first run
        creates its session, shrinking the arena after every segment (rule 14)."""
        return idle_bytes_at_segments(self._arena_events)

    def arena_footprint(self) -> int:
        """The pages of the shared arena the runs write, live activations and workspace
        included (rule 14): simulated on a model of onnxruntime's arena
        (``passes/memory/ort_arena.py``). Graph inputs are the caller's, outside it."""
        return arena_footprint(self._arena_events, ARENA_SIMULATED_RUNS)

    @functools.cached_property
    def _arena_events(self) -> list[ArenaEvent]:
        # A layout's spans never change: its allocations are replayed for the footprint and
        # for every creation check from one sequence.
        costs = self.costs
        workspace = [0] * costs.n
        for span in self.spans:
            for step in range(span.start, span.stop):
                workspace[step] = costs.activation(step, span.relaid) - costs.live[step] - costs.caller_held[step]
        return allocation_sequence(costs.graph, costs.liveness, [(s.start, s.stop) for s in self.spans], workspace)

    def step_bytes(self, cached: tuple[int, ...], arena: int = 0) -> list[int]:
        """Accounted bytes per step; ``arena``: with the shared arena kept across runs (rule 14),
        its footprint (:meth:`arena_footprint`) in place of each step's activations, graph
        inputs still needed beside it (they are the caller's, outside the arena); a session's
        creation, in a run that gives the arena back, with its pages no live tensor holds."""
        out: list[int] = []
        idle = self.arena_idle_at_creation if arena else []
        for index in range(len(self.spans)):
            steps, creation = self._base(index)
            if not self.costs.normal:
                nxt = self.next_of(index)
                during = sum(self._cache_cost(c) for c in cached if c not in (index, nxt))
                steps = [b + during for b in steps]
                if index in cached:
                    steps = [b + w for b, w in zip(steps, self._cached_workspace(index), strict=True)]
                creation += sum(self._cache_cost(c) for c in cached if c != index) if creation else 0
            if arena:   # beside it: the graph inputs the segment holds (rule 2) or the caller does (rule 7)
                span = self.spans[index]
                inputs = sum(nbytes for last, nbytes in self.costs.inputs
                             if last >= span.start or (self.costs.caller_inputs and nbytes >= CALLER_INPUT_BYTES))
                steps = [b - activation + arena + inputs for b, activation in zip(steps, span.step_activation,
                                                                                   strict=True)]
                creation = creation + idle[index] if creation else 0
            steps[0] = max(steps[0], creation)
            out.extend(steps)
        return out


StepCosts = _Costs   # what the tile pass's regions are priced with, as segments will be


def step_costs(graph: Graph, liveness: Liveness, mode: ExecutionMode, prepack_weights: bool = True,
               caller_inputs: bool = False) -> StepCosts:
    """The per-step facts segmentation accounts (live activations with workspace, weights held
    and loaded), for a pass that prices a segment of its own before there is one;
    ``caller_inputs``: with the graph inputs the caller holds (rule 7: under a cap, nothing pinned)."""
    return _Costs(graph, liveness, mode is ExecutionMode.NORMAL, prepack_weights, caller_inputs=caller_inputs)


def single_steps_of(costs: StepCosts, prefetch: bool) -> list[int]:
    """:func:`single_step_bytes` from costs already made."""
    return _single_steps(costs, prefetch and not costs.normal, 0)


def single_step_bytes(graph: Graph, liveness: Liveness, mode: ExecutionMode, *, prefetch: bool = True,
                      pinned_bytes: int = 0, prepack_weights: bool = True, caller_inputs: bool = False) -> list[int]:
    """Accounted bytes of every step when each step is its own segment (the bookkeeping
    of sessions kept across runs aside): for this order, no cap below their maximum
    admits that plan; streaming sizes its chunks off them (they are linear in the batch).
    ``caller_inputs``: with the graph inputs the caller holds (rule 7)."""
    normal = mode is ExecutionMode.NORMAL
    return _single_steps(_Costs(graph, liveness, normal, prepack_weights, caller_inputs=caller_inputs),
                         prefetch and not normal, pinned_bytes)


def _single_steps(costs: _Costs, prefetch: bool, pinned_bytes: int) -> list[int]:
    singles = []
    for step in range(costs.n):
        weights, activation = costs.weights[step], costs.activations[step]
        if costs.normal:
            cost = activation + costs.all_held + costs.transient(weights)
        elif prefetch:
            ahead = costs.loading(costs.weights[step + 1]) if costs.prefetched(step + 1) else 0
            cost = activation + costs.held(weights) + ahead
            if step == 0 or step in costs.isolated:
                cost = max(cost, activation + costs.loading(weights))
        else:
            cost = activation + costs.loading(weights)
            if costs.relaid_weights and step not in costs.region_starts:
                # Relaid, a Conv runs on NCHWc copies instead of MLAS's im2col buffer, which
                # can be the cheaper of the two (rule 13): the step runs whichever fits.
                cost = min(cost, costs.activation(step, True) + costs.loading(weights, True))
        singles.append(cost + pinned_bytes)
    return singles


def _check_single_steps(costs: _Costs, mode: ExecutionMode, memory_limit: int | None, prefetch: bool,
                        max_segment_steps: int | None, pinned_bytes: int) -> None:
    if memory_limit is None:
        return
    singles = _single_steps(costs, prefetch, pinned_bytes)
    needed = max(singles)
    if needed <= memory_limit:
        return
    worst = singles.index(needed)
    smallest, _ = _smallest_limit(costs, prefetch, max_segment_steps, pinned_bytes, needed - 1, needed)
    node = costs.liveness.order[worst]
    what = ("its live tensors and every weight as onnxruntime holds them" if costs.normal else
            "its live tensors, its weights as onnxruntime holds them"
            + (" and the next step's weights being prefetched" if prefetch else ""))
    raise MemoryLimitError(
        f"memory_limit {format_size(memory_limit)} ({memory_limit} bytes) cannot be met in "
        f"{mode.value} mode: step {worst} (node {node!r}, {costs.graph.nodes[node].op_type}) needs "
        f"{needed} bytes ({format_size(needed)}: {what}); the smallest limit that works in this mode is "
        f"{smallest} bytes", node=node, needed_bytes=needed, smallest_limit_bytes=smallest)
