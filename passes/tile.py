"""tile: steps that read only part of a weight (see :class:`TilePass`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hyperion.errors import MemoryLimitError
from hyperion.ir import SMALL_TENSOR_BYTES, ExecutionMode, Graph, NodeInfo, TensorInfo
from hyperion.passes._infra import Pass, PassResult, ensure, require
from hyperion.passes.liveness import activation_live_bytes, compute_liveness
from hyperion.passes.memory.costs import (
    SESSION_BOOKKEEPING_ALLOWANCE_BYTES,
    resident_bytes,
    session_bookkeeping_bytes,
    workspace_bytes,
)
from hyperion.passes.program import Program
from hyperion.passes.segment import SegmentPass, segment, single_steps_of, step_costs
from hyperion.passes.tile_ops import Geometry, geometry
from hyperion.passes.tile_regions import Region, find_regions, region_accounted

# A table smaller than this is read whole: a few pages, not worth a step of its own.
ROW_GATHER_MIN_BYTES = 1 << 20
# Rule 12: a weight this large that can only be fed unpacked whole runs faster as relaid tiles
# (GPT-2 small's 147 MiB lm_head: 185 ms unpacked against onnxruntime's whole model in 290).
RELAID_TILES_MIN_BYTES = 16 << 20
# Times patches are cut finer when the segments they leave need more than the cap (rule 13).
TIGHTER_CUTS = 2


@dataclass(frozen=True)
class RowGather:
    """A Gather (axis 0) over a weight that reads only the rows its indices name."""

    node: str
    weight: str          # the table: read row by row from its file, never mapped
    indices: str
    output: str
    rows: int            # rows in the table (axis 0); indices must lie in [-rows, rows)
    row_bytes: int       # bytes of one row (the product of the other dims, times the item size)
    read_bytes: int      # the most bytes the step reads: distinct indices at most, times row_bytes


@dataclass(frozen=True)
class TiledStep:
    """A step split along its output axis into tiles, each computed from one weight tile."""

    geometry: Geometry
    bounds: tuple[int, ...]      # tile edges along the tiled axis: 0, ..., size
    staging_bytes: int           # the widest tile's buffers, reused by every tile
    relaid: bool = False         # rule 12: each tile packed once into a file its own session maps

    @property
    def accounted_bytes(self) -> int:
        """What the tiled weight accounts: the widest tile's buffers, and relaid, while
        its session is first built."""
        return self.geometry.relaid_bytes(max(self.widths)) if self.relaid else self.staging_bytes

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False))


@dataclass(frozen=True)
class Tiling:
    """The tile pass's result: the steps that read a weight in part, by node."""

    row_gathers: Mapping[str, RowGather]
    tiled: Mapping[str, TiledStep] = dataclasses.field(default_factory=dict)
    regions: tuple[Region, ...] = ()     # runs of steps tiled along a free axis, in order

    def isolated_steps(self, order: tuple[str, ...]) -> frozenset[int]:
        """Steps run by Hyperion itself, not by a session: each is a segment of its own."""
        return frozenset(i for i, node in enumerate(order) if node in self.row_gathers or node in self.tiled)

    def kept_sessions(self, order: tuple[str, ...], prepack_weights: bool) -> dict[int, tuple[int, bool]]:
        """Per tiled step: the one-node sessions the runtime keeps across runs for it, and
        whether they are relaid -- one per tile when relaid (each maps its own packed tile),
        one per tile width when fed (tiles handed as inputs; as ``emit`` marks ``Tiles.fed``),
        none when each tile builds a session of its own and drops it."""
        kept = {}
        for step, node in enumerate(order):
            tiled = self.tiled.get(node)
            if tiled is None:
                continue
            if tiled.relaid:
                kept[step] = (len(tiled.widths), True)
            elif tiled.geometry.initializers_in_place and not prepack_weights:
                kept[step] = (len(set(tiled.widths)), False)
        return kept

    def region_staging(self, graph: Graph | None = None, order: tuple[str, ...] = (),
                       weights_fed: bool = False) -> dict[int, int]:
        """Per step of a region: the tile copies of its slices that are not contiguous; for a
        spatial region's steps also their kernel's workspace for one patch in place of what
        ``graph`` (the tiled one: interior tensors a patch each, inputs whole) prices."""
        staging = {}
        for region in self.regions:
            for i, step in enumerate(region.steps()):
                staging[step] = region.staging_bytes
                if region.workspace and graph is not None:
                    priced = workspace_bytes(graph, graph.nodes[order[step]], weights_fed=weights_fed)
                    staging[step] += region.workspace[i] - priced
        return staging


@dataclass(frozen=True)
class TilePass(Pass):
    """Steps that need only part of a large weight account only that part.

    Rules (memory_opt planning only: in ``normal`` mode every weight is resident
    anyway, so reading part of one saves nothing):

    1. a ``Gather`` of the default domain along axis 0 whose data input is a weight
       of at least ``ROW_GATHER_MIN_BYTES`` and whose indices have a known element
       count becomes a *row gather*: the step reads the rows its indices name from
       the weight's file (pread, never a mapping: the kernel maps files in large
       folios, so a mapped table costs far more RSS than the rows read) into a
       compact table and gathers from it;
    2. a row gather accounts ``min(index count, rows) * row_bytes`` for the table,
       not the table: the indices name at most that many distinct rows;
    3. only when every reader of the weight is a row gather (another reader would
       load the whole table anyway) and the weight is not a graph output; and only
       when the rows read are fewer than the table's;
    4. under a cap, a MatMul, Gemm or Conv (``tile_ops.py``: the axis of each that
       keeps results exact) whose step does not fit -- its live activations and its
       weight being loaded (held, plus the original while it is packed), and with
       prefetch the next step's weights being loaded -- is split along that axis
       into tiles, each computed by onnxruntime's kernel from one weight tile read
       into a buffer the tiles share, and written into the one output buffer;
    5. tiles are as wide as the cap allows, in multiples of ``TILE_UNIT``, and of
       equal width but the last; when even one unit does not fit, one unit it is,
       and the ``segment`` pass names the smallest cap: the step's live tensors
       (its output included) plus one tile; no tiles when they would not account
       less than the step whole (an output tile buffer can outweigh a small weight);
       and never narrower, nor for more steps, than the largest step that cannot be
       split requires: no cap below that step is met anyway (each split step is a
       segment, and a session, fewer);
    6. only when the weight has no other reader and is not a graph output;
    7. row gathers and tiled steps run outside one session of their segment, so
       each is a segment of its own (the ``segment`` pass reads
       :meth:`Tiling.isolated_steps`);
    8. under a cap (not while streaming chunks), a step that does not fit whole and
       cannot be split by its weight gets a *region* (``tile_regions.py``): a run of at
       most ``MAX_REGION_STEPS`` steps around it in the order, none of them a row gather
       or split by its weight, along which one axis is free (``tile_axes.py``: every op
       maps it to an axis of its outputs independently), started from an axis of an
       activation the first step reads, and in which some tensor is made and used up
       (its *interior*);
    9. the region's boundary inputs that carry the axis are read one slice per tile,
       the others whole; its outputs are written slice by slice into whole arrays; its
       interior tensors exist one tile at a time and are accounted so (their ``bytes``
       in ``program.graph`` the widest tile's); slices that are not contiguous (a dim
       before the axis is not 1) cost a tile copy each, counted at every step of it;
    10. the tile count is the fewest that fit the cap (equal widths but the last);
       among windows, those covering the most steps over the cap, then the fewest
       tiles, then the least staging (the outermost axis), then the shortest; under a
       cap below what the steps need at their best (the smallest cap's search), no
       regions unless, at one slice per tile, they lower the plan's largest step by
       more than the bookkeeping of the sessions they add (two each: its own, and the
       one it splits in two) as the ``segment`` pass charges it: beyond its allowance;
       when even one slice per tile does not fit, no region: no cap
       below what a step needs at its best is met, so regions are cut for that at least
       and the ``segment`` pass names the smallest cap;
    11. a region is one segment of its own, run by one session tile by tile;
    12. in a fed plan with ``relayout`` (``segment.py`` rule 13), tiles are *relaid* when
       they fit so: each tile packed (a Conv's re-laid in NCHWc blocks) once by
       onnxruntime's optimizer into a file its own session maps, dropped after the tile
       runs -- onnxruntime's packed kernels instead of unpacked ones, and no session
       built per tile and run. A tile then accounts, while its session
       is first built, its buffer and three times its packed copy, so relaid tiles are
       narrower; they are used only when that fits the budget (never raising the smallest
       cap), and the bookkeeping of the session each tile keeps (``segment.py`` rule 9)
       fits the room beside them or what the allowance leaves beside the segments'. A
       MatMul or Gemm whose weight (``RELAID_TILES_MIN_BYTES`` or more) fits fed whole but
       not relaid whole is split into relaid tiles too, when they fit: for speed, not memory;
    13. a *spatial* region (``tile_patches.py``) carries the rows of NCHW through Convs,
       ConvTransposes (kernel = stride), MaxPools and AveragePools, patch by patch with
       halos; a Conv split by its weight may run in one instead. Patches are tried in
       the smallest cap's search only when, segmented (``judge``), they lower the cap
       the ``segment`` pass names: each adds a session and breaks a segment in two.

    The weight's accounted size in ``program.graph`` becomes what the step holds of
    it: the most a row gather of it reads, or one tile (its shape the tile's, so the
    cost model prices the tile's packed copy; its ``bytes`` the tile's buffers).
    Writes ``program.tiling``. Postcondition: every row gather's and tiled step's
    node still reads its weight, a row gather accounts no more than its table, and
    tiles cover the tiled axis in order.
    """

    name: ClassVar[str] = "tile"
    prefetch: bool = True
    prepack_weights: bool = True
    relayout: bool = True
    judge: SegmentPass | None = None    # the pipeline's segment pass: weighs spatial regions (rule 13)

    def requires(self, program: Program) -> None:
        require(program.order is not None, self.name, "an order (the 'order' pass)")

    def call(self, program: Program) -> PassResult:
        graph = program.graph
        if program.planning_mode is ExecutionMode.NORMAL:
            tiling = Tiling({})
        else:
            gathers = row_gathers(graph)
            graph = graph.with_tensors(_accounted(graph, gathers.values())) if gathers else graph
            graph, regions, tiled = self._split(graph, program, frozenset(gathers))
            tiling = Tiling(gathers, tiled, regions)
        modified = tiling != program.tiling
        program.tiling = tiling
        program.graph = graph
        return PassResult(program, modified)

    def _split(self, graph: Graph, program: Program, gathered: frozenset[str]
               ) -> tuple[Graph, tuple[Region, ...], dict[str, TiledStep]]:
        """Rules 4-6 and 8-10: regions, then weight tiles on the graph they leave (their
        floor falls with the regions' steps). When a weight-tiled step still needs more than
        the regions were cut for, no cap below it is met: regions are cut again for it (rule
        10), fewer and coarser. Sets ``program.order`` (steps moved out of regions)."""
        limit, order = program.memory_limit, program.order or ()
        if limit is None:
            return graph, (), {}
        found = self._split_with(graph, program, gathered, order, limit, spatial=True)
        if self.judge is None or not found[1]:
            return found
        with_patches = self._refused_at(found, program, gathered, limit)
        budget, found_order = limit, program.order
        for _ in range(TIGHTER_CUTS):
            if not with_patches or with_patches > 2 * limit:   # met, or the smallest cap's search
                break
            # The segments need more than the regions were cut for (the bookkeeping of the
            # sessions kept beside them): cut the patches finer by what was missing.
            budget -= with_patches - limit
            tighter = self._split_with(graph, program, gathered, order, limit, spatial=True, budget=budget)
            refused = self._refused_at(tighter, program, gathered, limit)
            if refused < with_patches:
                found, with_patches, found_order = tighter, refused, program.order
        program.order = found_order
        if not with_patches or not any(r.patches is not None for r in found[1]):
            return found
        without = self._split_with(graph, program, gathered, order, limit, spatial=False)
        if self._refused_at(without, program, gathered, limit) < with_patches:
            return without
        program.order = found_order
        return found

    def _refused_at(self, split: tuple[Graph, tuple[Region, ...], dict[str, TiledStep]], program: Program,
                    gathered: frozenset[str], limit: int) -> int:
        """The smallest cap the ``segment`` pass names for this tiling at ``limit``; 0 when it fits."""
        assert self.judge is not None
        graph, regions, tiled = split
        order = program.order or ()
        isolated = frozenset(i for i, name in enumerate(order) if name in gathered or name in tiled)
        judge = self.judge
        try:
            segment(graph, compute_liveness(graph, order), program.planning_mode, limit, judge.max_segment_steps,
                    prefetch=judge.prefetch, weight_cache_bytes=judge.weight_cache_bytes,
                    pinned_bytes=judge.pinned_bytes, prepack_weights=judge.prepack_weights,
                    isolated=isolated, regions=tuple((r.start, r.stop) for r in regions),
                    staging=Tiling({}, tiled, regions).region_staging(graph, order, not self.prepack_weights),
                    relayout=judge.relayout,
                    tile_sessions=Tiling({}, tiled, regions).kept_sessions(order, judge.prepack_weights))
        except MemoryLimitError as refusal:
            return refusal.smallest_limit_bytes or limit + 1
        return 0

    def _split_with(self, graph: Graph, program: Program, gathered: frozenset[str], order: tuple[str, ...],
                    limit: int, spatial: bool, budget: int | None = None
                    ) -> tuple[Graph, tuple[Region, ...], dict[str, TiledStep]]:
        """Regions cut for ``budget`` (the cap, unless given), then weight tiles for the cap."""
        regions, tiled, split, budget = (), {}, graph, limit if budget is None else budget
        for _ in range(2):
            regions, program.order = self._regions(graph, program, gathered, budget, order, spatial)
            split = graph.with_tensors(region_accounted(graph, regions)) if regions else graph
            inside = frozenset(n for r in regions if r.patches is not None for n in program.order[r.start:r.stop])
            tiled = tiled_steps(split, program.order, limit, self.prefetch, self.prepack_weights,
                                relayout=self.relayout and not self.prepack_weights, in_regions=inside)
            split = split.with_tensors(_tile_accounted(split, tiled.values())) if tiled else split
            floor = self._tiled_floor(split, program, tiled)
            if not regions or floor <= budget:
                break
            budget = floor
        return split, regions, tiled

    def _tiled_floor(self, graph: Graph, program: Program, tiled: Mapping[str, TiledStep]) -> int:
        """The most a weight-tiled step needs as a segment of its own, its tiles accounted."""
        if not tiled:
            return 0
        order = program.order or ()
        singles = single_steps_of(step_costs(graph, compute_liveness(graph, order), program.planning_mode,
                                             self.prepack_weights, _caller_inputs(program)), self.prefetch)
        return max(singles[i] for i, name in enumerate(order) if name in tiled)

    def _regions(self, graph: Graph, program: Program, gathered: frozenset[str], budget: int,
                 order: tuple[str, ...], spatial: bool) -> tuple[tuple[Region, ...], tuple[str, ...]]:
        """Rules 8-10: the regions ``order`` needs under ``budget``, and the order with the
        steps of each region's window that are no part of it moved before it."""
        if program.batch_chunk is not None or not order:
            return (), order
        liveness = compute_liveness(graph, order)
        costs = step_costs(graph, liveness, program.planning_mode, self.prepack_weights, _caller_inputs(program))
        splittable = frozenset(i for i, name in enumerate(order) if _splittable(graph, name) is not None)
        # A Conv split by its weight may instead run in a spatial region, patch by patch.
        excluded = frozenset(i for i, name in enumerate(order) if name in gathered or (
            i in splittable and (not spatial or graph.nodes[name].op_type != "Conv")))
        return find_regions(graph, liveness, costs, self.prefetch, budget, excluded, splittable, spatial)

    def ensures(self, program: Program) -> None:
        tiling = program.tiling
        ensure(tiling is not None, self.name, "no tiling was recorded")
        assert tiling is not None
        for gather in tiling.row_gathers.values():
            node = program.graph.nodes[gather.node]
            ensure(node.inputs[0] == gather.weight, self.name, f"node {gather.node!r} does not read {gather.weight!r}")
            ensure(gather.read_bytes <= gather.rows * gather.row_bytes, self.name,
                   f"row gather {gather.node!r} accounts more than its table")
        for tiled in tiling.tiled.values():
            geometry = tiled.geometry
            ensure(geometry.weight in program.graph.nodes[geometry.node].inputs, self.name,
                   f"node {geometry.node!r} does not read {geometry.weight!r}")
            bounds = tiled.bounds
            ensure(bounds[0] == 0 and bounds[-1] == geometry.size and all(w > 0 for w in tiled.widths),
                   self.name, f"the tiles of {geometry.node!r} do not cover its axis in order")
        isolated = tiling.isolated_steps(program.order or ())
        ensure(program.graph.is_topological_order(program.order or ()), self.name,
               "moving steps out of regions left an order that is not topological")
        for region in tiling.regions:
            ensure(region.bounds[0] == 0 and region.bounds[-1] == region.size and all(w > 0 for w in region.widths)
                   and not isolated & set(region.steps()), self.name,
                   f"the region at steps {region.start}-{region.stop - 1} does not cover its axis in order, "
                   "or holds a step run by Hyperion itself")


def row_gathers(graph: Graph) -> dict[str, RowGather]:
    """Rule 1-3: the Gathers over large weights that can read only their rows."""
    candidates = {node.name: gather for node in graph.nodes.values()
                  if (gather := _row_gather(graph, node)) is not None}
    readers_ok = {w for w in {g.weight for g in candidates.values()}
                  if all(c in candidates for c in graph.tensors[w].consumers) and w not in graph.outputs}
    return {name: g for name, g in candidates.items() if g.weight in readers_ok}


def _row_gather(graph: Graph, node: NodeInfo) -> RowGather | None:
    if node.op_type != "Gather" or not node.is_default_domain or len(node.inputs) != 2:
        return None
    weight, indices = node.inputs
    table, index = graph.tensors[weight], graph.tensors[indices]
    if not graph.is_weight(weight) or not table.shape or table.dtype not in np.sctypeDict:
        return None
    if node.int_attribute("axis", 0) not in (0, -len(table.shape)):
        return None
    # From the shape, not ``nbytes``: an earlier tile pass may have resized the table's account.
    table_elements, count = _elements(table), _elements(index)
    rows = int(table.shape[0])
    if table_elements is None or count is None or rows == 0:
        return None
    table_bytes = table_elements * np.dtype(table.dtype).itemsize
    if table_bytes < max(ROW_GATHER_MIN_BYTES, SMALL_TENSOR_BYTES):
        return None
    row_bytes = table_bytes // rows
    read = min(count, rows) * row_bytes
    if read >= table_bytes:
        return None
    return RowGather(node.name, weight, indices, node.outputs[0], rows, row_bytes, read)


def _elements(tensor: TensorInfo) -> int | None:
    if tensor.shape is None or not all(isinstance(d, int) for d in tensor.shape):
        return None
    return math.prod(int(d) for d in tensor.shape)


def _accounted(graph: Graph, gathers: Iterable[RowGather]) -> dict[str, TensorInfo]:
    """The tensor table with each row-gathered weight sized as the most one gather of it reads."""
    read: dict[str, int] = {}
    for gather in gathers:
        read[gather.weight] = max(read.get(gather.weight, 0), gather.read_bytes)
    tensors = dict(graph.tensors)
    for weight, nbytes in read.items():
        tensors[weight] = dataclasses.replace(tensors[weight], nbytes=nbytes)
    return tensors


# -- tiles --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _StepCost:
    """What a tiled step accounts, as the ``segment`` pass will for a segment of its own:
    its live activations and its weights being loaded (held, plus the largest original
    while packing), with prefetch also the next step's weights being loaded (a tiled step
    itself is never prefetched)."""

    shape: Geometry
    activations: int
    others_held: int         # the step's other weights (a bias), as held
    others_plain: int        # the largest of them, as read
    ahead: int               # the next step's loading, with prefetch
    prepack: bool
    workspace: int           # the kernel's workspace, the step whole (``costs.workspace_bytes``)
    tiled_workspace: int     # ... and tiled: weight tiles are constant initializers of their sessions
    relaid: bool = False     # rule 12: tiles packed once, each mapped by a session of its own

    def __call__(self, width: int) -> int:
        if self.relaid:
            return self._with(self.shape.relaid_bytes(width), 0, self.tiled_workspace)
        return self._with(self.shape.held_bytes(width, self.prepack), self.shape.accounted_bytes(width),
                          self.tiled_workspace)

    def relaid_sessions(self, width: int) -> int:
        """The bookkeeping of the sessions relaid tiles ``width`` wide keep: one per tile."""
        return -(-self.shape.size // width) * session_bookkeeping_bytes(1, relaid=True)

    def relaid_whole(self) -> int:
        """The step whole in a relaid segment (``segment.py`` rule 13): its weight packed,
        and the largest weight twice more while the session is built."""
        packed = self.shape.held_bytes(self.shape.size, True)
        plain = math.prod(self.shape.weight_shape) * 4
        return self.activations + self.tiled_workspace + packed + self.others_held + 2 * max(plain, self.others_plain)

    def untiled(self, held: int, plain: int) -> int:
        """The step whole, its weight as onnxruntime holds it."""
        return self._with(held, plain, self.workspace)

    def _with(self, weight_held: int, weight_plain: int, workspace: int) -> int:
        loading = weight_held + self.others_held
        if self.prepack:
            loading += max(weight_plain, self.others_plain)
        return self.activations + workspace + loading + self.ahead

    def widest(self, memory_limit: int) -> int:
        """The widest tile (whole units) that fits ``memory_limit``; one unit if none does."""
        unit = self.shape.unit
        low, high = 1, self.shape.size // unit       # in units; the cost grows with the width
        while low < high:
            middle = (low + high + 1) // 2
            if self(middle * unit) <= memory_limit:
                low = middle
            else:
                high = middle - 1
        return low * unit


def tiled_steps(graph: Graph, order: tuple[str, ...], memory_limit: int, prefetch: bool,
                prepack: bool, relayout: bool = False, in_regions: frozenset[str] = frozenset()
                ) -> dict[str, TiledStep]:
    """Rules 4-6 and 12: the steps that do not fit whole, and their tiles; with ``relayout``
    (a fed plan), relaid tiles where they fit; ``in_regions``: the steps spatial regions
    run (priced by their regions, never split by their weight)."""
    liveness = compute_liveness(graph, order)
    activations = activation_live_bytes(graph, liveness)   # kernel workspace is added per step below
    weights = [graph.weights_of(node) for node in order]
    plain = {w: graph.tensors[w].nbytes or 0 for ws in weights for w in ws}
    held = {w: resident_bytes(graph, w) if prepack else plain[w] for w in plain}

    def loading(names: tuple[str, ...]) -> int:
        return sum(held[w] for w in names) + (max((plain[w] for w in names), default=0) if prepack else 0)

    def ahead(step: int) -> int:
        return loading(weights[step + 1]) if prefetch and step + 1 < len(order) else 0

    shapes = {name: None if name in in_regions else _splittable(graph, name) for name in order}
    # No cap below the largest step that cannot be split is met: tiles need be no narrower.
    floor = max((activations[i] + workspace_bytes(graph, graph.nodes[name], weights_fed=not prepack)
                 + loading(weights[i]) + ahead(i) for i, name in enumerate(order)
                 if shapes[name] is None and name not in in_regions), default=0)
    budget = max(memory_limit, floor)
    tiled: dict[str, TiledStep] = {}
    # The bookkeeping of the sessions relaid tiles keep (``segment.py`` rule 9) must fit the
    # budget's room beside the tiles, or what the allowance the segment pass grants kept
    # sessions leaves beside the segments' (at the least one session over every step that
    # cannot be split): else a larger cap could choose relaid tiles whose sessions then fit
    # nowhere, and name no plan where a smaller cap had one.
    room = SESSION_BOOKKEEPING_ALLOWANCE_BYTES - session_bookkeeping_bytes(
        sum(1 for name in order if shapes[name] is None))
    kept = [0]   # what the relaid tiles chosen so far keep

    def fits_relaid(cost: _StepCost, width: int) -> bool:
        sessions = kept[0] + cost.relaid_sessions(width)
        if cost(width) > budget or sessions > room + budget - cost(width):
            return False
        kept[0] = sessions
        return True

    for step, name in enumerate(order):
        shape = shapes[name]
        if shape is None:
            continue
        others = [w for w in weights[step] if w != shape.weight]
        node = graph.nodes[name]
        cost = _StepCost(
            shape, activations[step], sum(held[w] for w in others), max((plain[w] for w in others), default=0),
            ahead(step), prepack,
            workspace_bytes(graph, node, weights_fed=not prepack), _tiled_workspace(graph, node, shape, prepack))
        whole = cost.untiled(held[shape.weight], plain[shape.weight])
        relaid = dataclasses.replace(cost, relaid=True) if relayout else None
        if whole <= budget:
            # Rule 12: fed whole it runs unpacked; relaid tiles run packed where relaid whole cannot.
            if relaid is not None and shape.packed and plain[shape.weight] >= RELAID_TILES_MIN_BYTES \
                    and relaid.relaid_whole() > budget and fits_relaid(relaid, width := relaid.widest(budget)):
                tiled[name] = _balanced(shape, width, relaid=True)
            continue
        if relaid is not None and fits_relaid(relaid, width := relaid.widest(budget)):
            tiled[name] = _balanced(shape, width, relaid=True)
            continue
        width = cost.widest(budget)
        if width < shape.size and cost(width) < whole:  # tiles must help: not when the output dominates
            tiled[name] = _balanced(shape, width)
    return tiled


def _splittable(graph: Graph, name: str) -> Geometry | None:
    """Rule 6: how ``name`` splits, when its weight is its own."""
    shape = geometry(graph, graph.nodes[name])
    if shape is None or shape.weight in graph.outputs or graph.tensors[shape.weight].consumers != (name,):
        return None
    return shape


def _tiled_workspace(graph: Graph, node: NodeInfo, shape: Geometry, prepack: bool) -> int:
    """The step's kernel workspace with its weight a tile of one unit: as the ``segment``
    pass prices it once the weight is accounted as a tile (a small tile is never fed)."""
    names = dict.fromkeys((*node.inputs, *node.outputs))
    tensors = {n: dataclasses.replace(graph.tensors[n], producer=None) for n in names}
    tensors[shape.weight] = dataclasses.replace(tensors[shape.weight], shape=shape.tile_shape(shape.unit),
                                                nbytes=shape.accounted_bytes(shape.unit, fed=not prepack))
    alone = Graph([dataclasses.replace(node)], tensors, (), ())
    return max(workspace_bytes(alone, node, weights_fed=not prepack), workspace_bytes(graph, node, weights_fed=False))


def _balanced(shape: Geometry, widest: int, relaid: bool = False) -> TiledStep:
    """As few tiles as ``widest`` allows, of equal width (whole units) but the last."""
    count = _ceil_div(shape.size, widest)
    width = min(widest, _ceil_div(_ceil_div(shape.size, count), shape.unit) * shape.unit)
    bounds = (*range(0, shape.size, width), shape.size)
    return TiledStep(shape, bounds, shape.staging_bytes(width), relaid)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _tile_accounted(graph: Graph, tiled: Iterable[TiledStep]) -> dict[str, TensorInfo]:
    """The tensor table with each tiled weight sized and shaped as its widest tile."""
    tensors = dict(graph.tensors)
    for step in tiled:
        shape = step.geometry
        tensors[shape.weight] = dataclasses.replace(tensors[shape.weight], shape=shape.tile_shape(max(step.widths)),
                                                    nbytes=step.accounted_bytes)
    return tensors


def _caller_inputs(program: Program) -> bool:
    """Whether segmentation counts the graph inputs the caller holds (segment rule 7): under a
    cap, outside streaming (whose pinned bytes hold the whole batch's inputs)."""
    return program.memory_limit is not None and program.batch_chunk is None
