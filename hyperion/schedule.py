"""The schedule: the compiled plan as plain, frozen data, saved and loaded as JSON.

A schedule is the whole contract between the planner and the runtime: every
decision the runtime carries out -- which sessions live across runs, what is
prefetched, which constants a segment recomputes, how the batch is chunked,
what type a segment model declares for each tensor at its boundary -- is a
typed field here, so the runtime reads and never decides, and a saved schedule
runs without the graph, shape inference or any pass (:func:`hyperion.load`).

The same model and options give byte-identical files (sorted keys, a stable
order of records). docs/schedule_format.md documents every field.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperion.errors import ScheduleError
from hyperion.files import refuse_overwrite, write_atomic
from hyperion.ir import EdgeKind, ExecutionMode, ExternalLocation, TensorRole

if TYPE_CHECKING:
    from hyperion.frontend.source import ModelSource

FORMAT = "hyperion.schedule"
# Bumped whenever a field is added, removed or changes meaning; a file of another
# version is refused with a message saying what to do (see docs/schedule_format.md).
VERSION = 2
# Bounds on what loading a schedule file reads: its size, and how deeply its JSON nests
# (a valid schedule nests about 8 deep; the bound leaves room for nested value types).
MAX_SCHEDULE_BYTES = 1 << 30
MAX_JSON_DEPTH = 64

Dim = int | str | None


@dataclass(frozen=True)
class ModelRef:
    path: str | None
    sha256: str
    opset: int


@dataclass(frozen=True)
class ValueType:
    """The ONNX type a segment model declares for a tensor at a segment boundary.

    Only what onnx's shape inference (or the model itself) states is recorded:
    onnxruntime checks declared shapes against the arrays fed, so an estimate
    (onnxruntime's symbolic inference) contributes the element type alone.
    """

    kind: str                            # tensor, sparse_tensor, sequence, optional, map
    elem_type: str | None                # tensor, sparse_tensor: ONNX element type ("FLOAT"); map: key type
    shape: tuple[Dim, ...] | None        # tensor, sparse_tensor: None = no shape; a dim: size, name, or None
    element: ValueType | None            # sequence, optional: the element's type; map: the value's type


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int | str, ...] | None
    bytes: int | None
    role: TensorRole
    producer: str | None
    consumers: tuple[str, ...]
    external: ExternalLocation | None        # weights stored as ONNX external data
    value_type: ValueType | None         # tensors some segment reads or returns; None otherwise
    # ``bytes`` is an upper bound from the op's semantics (NonZero, TopK, If, ...): the data
    # decides the real size, which is never larger. A file may leave it out (absent: false).
    upper_bound: bool = False


@dataclass(frozen=True)
class RowGather:
    """A Gather (axis 0) over a weight that the runtime runs itself, reading only the rows
    its indices name from the weight's file (``tensors[weight].external``, or the file an
    in-memory model's embedded weights are spilled to)."""

    weight: str          # the table
    indices: str
    output: str
    rows: int            # rows of the table; indices outside [-rows, rows) are an error
    row_bytes: int
    read_bytes: int      # the most bytes read: distinct indices at most, times row_bytes


@dataclass(frozen=True)
class Tiles:
    """A step the runtime runs tile by tile: its output split along ``output_axis`` at
    ``bounds``, each tile computed by the step's op from one weight tile (and bias tile)
    read into a buffer every tile reuses, and written into the one output buffer."""

    weight: str
    bias: str | None           # sliced with the weight; None: absent, or one value for every tile
    output: str
    output_axis: int
    weight_axis: int           # the weight's axis the tiles slice: 0 -> each tile one contiguous read
    bounds: tuple[int, ...]    # tile edges: 0, ..., the axis' length
    in_place: bool             # output slices are contiguous: tiles are bound straight into the output
    staging_bytes: int         # the weight tile's buffer, plus an output tile's when not in place
    initializers_in_place: bool  # sessions use the weight tile's buffer in place; else onnxruntime copies it
    # Tiles are inputs of one session per tile width, built once and kept (a fed plan's MatMul,
    # Gemm or Conv: unpacked, as its other fed weights); else each tile builds a session of its own.
    fed: bool = False            # optional in the file
    # Each tile is packed once by onnxruntime's optimizer into a file its own session maps,
    # built once and kept; the mapped pages are dropped after the tile runs (a fed plan's
    # MatMul or Gemm, as a relaid segment's weights).
    relaid: bool = False         # optional in the file
    # A column tile (weight_axis 1) is read with one positioned read per run of up to 512 rows,
    # the bytes between its columns read into a buffer this large (part of staging_bytes);
    # 0: one read per row.
    skip_bytes: int = 0          # optional in the file
    # Column tiles are read from a copy of the weight laid out tile after tile, one read each,
    # written once per machine into Hyperion's cache from the strided reads (a fed plan's).
    tile_major: bool = False     # optional in the file


@dataclass(frozen=True)
class PatchPad:
    """Rows of padding a Conv or pool of a spatial region is handed above and below its
    input, per patch: the padding the whole op adds where a patch touches the tensor's top
    or bottom, none inside (its own padding along the rows is then 0)."""

    node: str
    input: str                       # the tensor it pads (the node's input 0)
    shape: tuple[int, ...]           # that tensor's whole shape (the rows: axis 2)
    dtype: str
    fill: float                      # 0, or the lowest float for MaxPool (which ignores padding)
    rows: tuple[tuple[int, int], ...]  # per patch: (rows above, rows below)


@dataclass(frozen=True)
class PatchCrop:
    """The rows one reader takes of what a tensor of a spatial region holds, per patch,
    when it needs fewer than the tensor holds (a shorter halo, or a region output)."""

    tensor: str
    reader: str                      # the node; "" the segment's output of that name
    axis: int                        # the tensor's rows
    rows: tuple[tuple[int, int], ...]  # per patch: [start, stop) within what the tensor holds


@dataclass(frozen=True)
class Patches:
    """A region tiled along rows through Convs and pools: what each patch is fed and cut."""

    rows: Mapping[str, tuple[tuple[int, int], ...]]  # every sliced input: its rows [start, stop) per patch
    pads: tuple[PatchPad, ...]
    crops: tuple[PatchCrop, ...]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Patches:
        def pairs(rows: Any) -> tuple[tuple[int, int], ...]:
            return tuple((int(a), int(b)) for a, b in rows)
        return Patches(rows={k: pairs(v) for k, v in data["rows"].items()},
                       pads=tuple(PatchPad(**{**p, "shape": tuple(p["shape"]), "rows": pairs(p["rows"])})
                                  for p in data["pads"]),
                       crops=tuple(PatchCrop(**{**c, "rows": pairs(c["rows"])}) for c in data["crops"]))


@dataclass(frozen=True)
class Region:
    """A segment the runtime runs tile by tile along one free axis: one session over its
    nodes, run once per tile on ``sliced`` inputs cut at ``bounds``, its outputs written
    slice by slice into whole arrays; the tensors made and used up inside it only ever
    exist one tile at a time."""

    size: int                      # the free axis' length
    bounds: tuple[int, ...]        # tile edges along it: 0, ..., size
    sliced: Mapping[str, int]      # inputs read one slice per tile: the axis each carries it on
    outputs: Mapping[str, int]     # every output of the segment: the axis it is written along
    staging_bytes: int             # tile copies of slices that are not contiguous (accounted)
    # Spatial patches (rows through Convs and pools, with halos): ``bounds`` cut the
    # outputs' rows; each sliced input is fed its own rows; optional in the file.
    patches: Patches | None = None


@dataclass(frozen=True)
class Step:
    index: int
    node: str
    op_type: str
    segment: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    frees: tuple[str, ...]     # marked unneeded right after this step
    loads: tuple[str, ...]     # weights made resident before this step
    evicts: tuple[str, ...]    # weights released after this step
    live_bytes: int
    # Run by Hyperion from the rows it names, not by a session (a segment of its own);
    # a file may leave it out (absent means None).
    row_gather: RowGather | None = None
    tiles: Tiles | None = None           # run tile by tile by Hyperion (a segment of its own); may be absent


@dataclass(frozen=True)
class Segment:
    index: int
    first_step: int
    last_step: int
    inputs: tuple[str, ...]    # activations and graph inputs it reads from earlier segments
    outputs: tuple[str, ...]   # what later segments or the caller read
    weights: tuple[str, ...]
    peak_bytes: int
    model_inputs: tuple[str, ...]       # ``inputs`` less ``inlined_constants``: what its model is fed
    inlined_constants: tuple[str, ...]  # small Constant outputs its model recomputes instead of taking
    cached: bool                        # its session keeps its weights resident across runs (weight cache)
    held_bytes: int                     # what its live session holds for its weights
    loading_bytes: int                  # the most while its session is created
    fed_weights: tuple[str, ...]        # weights mapped from disk and fed to its session on every run
    persistent: bool                    # its session is built once and kept across runs
    # onnxruntime may fold nodes of constant inputs into initializers of its own when the
    # session is built; False where that would hold generated weights the plan counts as
    # activations (a capped plan whose segment makes large tensors from constants alone).
    fold_constants: bool = True   # optional in the file: version 2 schedules written before it load
    # Its session is built once through onnxruntime's optimizer with the fed weights as
    # constants (MatMul/Gemm weights packed, convolutions re-laid for its NCHWc kernels,
    # BatchNormalization folded in), written to a file the session maps; the mapped pages
    # are dropped after every run (hyperion.runtime.relayout).
    relaid: bool = False          # optional in the file
    region: Region | None = None  # run tile by tile along a free axis; optional in the file

    @property
    def steps(self) -> range:
        return range(self.first_step, self.last_step + 1)


@dataclass(frozen=True)
class EdgeRecord:
    src: str
    dst: str
    tensor: str
    kind: EdgeKind


@dataclass(frozen=True)
class Streaming:
    """How a ``streaming`` schedule splits the batch (axis 0 of the batched inputs)."""

    batch_size: int                      # samples in the whole batch
    chunk: int                           # samples per run of the segments
    batched_inputs: tuple[str, ...]      # inputs sliced along axis 0; the others are fed whole
    bytes_per_sample: int                # of the batched graph inputs and outputs, held for the whole run


class Observe(enum.Enum):
    """What a re-plan point reads off a run: a tensor's shape, or (small integer tensors
    that decide a later size, e.g. Range's limit) its value."""

    SHAPE = "shape"
    VALUE = "value"


@dataclass(frozen=True)
class ReplanPoint:
    """A tensor whose size (or value) the data decides, observed after ``step`` runs."""

    tensor: str
    step: int                 # the step of this schedule that decides it; -1: a graph input (the feeds)
    observe: Observe
    accounted_bytes: int      # what this schedule counts for it: its bound, or 0 when the bound did not fit


@dataclass(frozen=True)
class Replan:
    """This schedule is the prefix of the model: the runtime runs it, and the rest
    (``suffix_nodes``) is imported with the points' observed shapes and values bound and
    planned under the same cap, once per observed signature (hyperion.replan)."""

    points: tuple[ReplanPoint, ...]
    suffix_nodes: tuple[str, ...]        # the model's nodes planned at run time, in file order
    outputs: tuple[str, ...]             # what a whole run returns, in the model's order
    reason: str                          # why the model is re-planned and which plans exist


@dataclass(frozen=True)
class Schedule:
    model: ModelRef
    mode: ExecutionMode                  # normal, memory_opt or streaming: how the plan runs
    requested_mode: ExecutionMode        # what was asked for (adaptive included)
    mode_reason: str
    memory_limit: int | None
    peak_bytes: int
    lower_bound_bytes: int
    arena_bytes: int
    input_shapes: Mapping[str, tuple[int | str, ...]]
    tensors: Mapping[str, TensorRecord]
    steps: tuple[Step, ...]
    segments: tuple[Segment, ...]
    edges: tuple[EdgeRecord, ...]
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]
    whole_model: bool                    # one session of the user's model, untouched
    weights_on_disk: bool                # sessions read weights from files, never from the model proto
    prefetch: bool                       # the next segment's session is built while one computes
    cyclic_prefetch: bool                # the last segment prefetches segment 0 for the next run
    prepack_weights: bool                # sessions pack MatMul/Gemm weights (the plan counts it)
    intra_op_spinning: bool              # onnxruntime's idle workers spin (one session only)
    pinned_bytes: int                    # held for the whole run outside the graph (streaming's batch)
    streaming: Streaming | None
    # Proven minimum over all orders (one step per segment); None when the search did not
    # prove it. The one field a file may leave out (it was added last; absent means None).
    optimal_peak_bytes: int | None = None
    # Data-dependent sizes: this schedule plans the prefix up to the steps that decide them;
    # None: the whole model is planned. A file may leave it out (absent means None).
    replan: Replan | None = None
    # The footprint of the onnxruntime arena the sessions share, whose pages runs keep for the
    # next (the plan counts it at every step in place of the activations; segment rule 14);
    # 0: no arena, freed large blocks go back to the OS. A file may leave it out (absent: 0).
    kept_heap_bytes: int = 0
    format: str = FORMAT
    version: int = VERSION

    @property
    def packed_kernels(self) -> bool:
        """Whether every GEMM runs on packed weights, as plain onnxruntime's do: sessions
        pre-pack, or -- a fed plan -- every segment holding weights is relaid (packed once,
        mapped) and so is every tiled step. False when some weights reach a session
        unpacked (fed plainly, or held by a session of a fed plan, which packs nothing)."""
        if self.prepack_weights:
            return True
        for segment in self.segments:
            first = self.steps[segment.first_step]
            if first.tiles is not None:
                if not first.tiles.relaid:
                    return False
            elif first.row_gather is None and segment.weights and not segment.relaid:
                return False
        return True

    # -- display --------------------------------------------------------------------
    def __repr__(self) -> str:
        """One line: ``<Schedule demo.onnx memory_opt: 42 steps, 5 segments, peak 1.3 MiB, cap 1.5 MiB>``."""
        from hyperion.tools.notebook import schedule_repr  # tools sit on top of the core: imported late

        return schedule_repr(self)

    def _repr_html_(self) -> str:
        """Jupyter's view: the summary table and the memory timeline (with matplotlib)."""
        from hyperion.tools.notebook import schedule_html

        return schedule_html(self)

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then a rename. Refuses
        (:class:`~hyperion.errors.OutputError`) to replace the model or one of its data files."""
        refuse_overwrite(path, [("the model", self.model.path), *(
            (f"the external data of weight {t.name!r}", t.external.path)
            for t in self.tensors.values() if t.external is not None)], option="schedule")
        return write_atomic(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, label: str = "<schedule>") -> Schedule:
        validate(data, label)
        streaming = data["streaming"]
        return cls(
            model=ModelRef(**data["model"]),
            mode=ExecutionMode(data["mode"]),
            requested_mode=ExecutionMode(data["requested_mode"]),
            mode_reason=data["mode_reason"],
            memory_limit=data["memory_limit"],
            peak_bytes=data["peak_bytes"],
            lower_bound_bytes=data["lower_bound_bytes"],
            arena_bytes=data["arena_bytes"],
            optimal_peak_bytes=data.get("optimal_peak_bytes"),
            input_shapes={k: tuple(v) for k, v in data["input_shapes"].items()},
            tensors={k: _tensor(v) for k, v in data["tensors"].items()},
            steps=tuple(_step(s) for s in data["steps"]),
            segments=tuple(_segment(s, label) for s in data["segments"]),
            edges=tuple(EdgeRecord(e["src"], e["dst"], e["tensor"], EdgeKind(e["kind"])) for e in data["edges"]),
            graph_inputs=tuple(data["graph_inputs"]),
            graph_outputs=tuple(data["graph_outputs"]),
            whole_model=data["whole_model"],
            weights_on_disk=data["weights_on_disk"],
            prefetch=data["prefetch"],
            cyclic_prefetch=data["cyclic_prefetch"],
            prepack_weights=data["prepack_weights"],
            intra_op_spinning=data["intra_op_spinning"],
            pinned_bytes=data["pinned_bytes"],
            streaming=None if streaming is None else Streaming(**_tuples(streaming)),
            replan=_replan(data.get("replan")),
            kept_heap_bytes=data.get("kept_heap_bytes", 0),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read, parse and validate a schedule file (at most ``MAX_SCHEDULE_BYTES``, JSON
        nested at most ``MAX_JSON_DEPTH`` deep). See :func:`check_consistency` for the
        checks against the model it runs."""
        path = Path(path)
        if not path.exists():
            raise ScheduleError(f"{path}: no such schedule file")
        if not path.is_file():  # a folder, or a FIFO or device that could block forever
            raise ScheduleError(f"{path}: is {'a folder' if path.is_dir() else 'not a regular file'}, "
                                "not a schedule file")
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_SCHEDULE_BYTES + 1)
        except OSError as exc:
            raise ScheduleError(f"{path}: cannot read the schedule ({exc.strerror or exc})") from None
        if len(raw) > MAX_SCHEDULE_BYTES:
            raise ScheduleError(f"{path}: larger than {MAX_SCHEDULE_BYTES} bytes: not a schedule Hyperion wrote")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, or an integer of 4300+ digits
            raise ScheduleError(f"{path}: not a schedule file (invalid JSON: {_first_line(exc)})") from None
        except RecursionError:
            raise ScheduleError(f"{path}: not a schedule file (JSON nested deeper than {MAX_JSON_DEPTH})") from None
        return cls.from_dict(data, label=str(path))

    # -- reading ------------------------------------------------------------------------
    def segment_of(self, step: int) -> Segment:
        return self.segments[self.steps[step].segment]

    @property
    def batch_chunk(self) -> int | None:
        """Samples per chunk of a streaming schedule; None when the batch runs whole."""
        return None if self.streaming is None else self.streaming.chunk


def _tuples(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with JSON lists as tuples (the dataclasses hold tuples: hashable, frozen)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


def _step(data: Mapping[str, Any]) -> Step:
    fields = _tuples(data)
    row_gather, tiles = fields.pop("row_gather", None), fields.pop("tiles", None)
    return Step(**fields, row_gather=None if row_gather is None else RowGather(**row_gather),
                tiles=None if tiles is None else Tiles(**_tuples(tiles)))


def _tensor(data: Mapping[str, Any]) -> TensorRecord:
    external, value_type = data["external"], data["value_type"]
    return TensorRecord(
        name=data["name"], dtype=data["dtype"], shape=None if data["shape"] is None else tuple(data["shape"]),
        bytes=data["bytes"], role=TensorRole(data["role"]), producer=data["producer"],
        consumers=tuple(data["consumers"]), external=None if external is None else ExternalLocation(**external),
        value_type=None if value_type is None else _value_type(value_type),
        upper_bound=data.get("upper_bound", False))


def _replan(data: Mapping[str, Any] | None) -> Replan | None:
    if data is None:
        return None
    points = tuple(ReplanPoint(p["tensor"], p["step"], Observe(p["observe"]), p["accounted_bytes"])
                   for p in data["points"])
    return Replan(points, tuple(data["suffix_nodes"]), tuple(data["outputs"]), data["reason"])


def _value_type(data: Mapping[str, Any]) -> ValueType:
    element = data["element"]
    return ValueType(kind=data["kind"], elem_type=data["elem_type"],
                     shape=None if data["shape"] is None else tuple(data["shape"]),
                     element=None if element is None else _value_type(element))


def _region(data: Mapping[str, Any]) -> Region:
    fields = _tuples(data)
    patches = fields.pop("patches", None)
    return Region(**fields, patches=None if patches is None else Patches.from_json(patches))


def _segment(data: Mapping[str, Any], label: str) -> Segment:
    fields = _tuples(data)
    region = fields.pop("region", None)
    segment = Segment(**fields, region=None if region is None else _region(region))
    inlined = set(segment.inlined_constants)
    if segment.model_inputs != tuple(n for n in segment.inputs if n not in inlined):
        raise ScheduleError(f"{label}: not a valid Hyperion schedule at segments/{segment.index}: model_inputs "
                            "must be inputs less inlined_constants, in order")
    if segment.relaid and (not segment.fed_weights or segment.region is not None):
        raise ScheduleError(f"{label}: not a valid Hyperion schedule at segments/{segment.index}: relaid "
                            "needs fed_weights (only fed weights are re-laid) and no region")
    return segment


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@cache
def schema() -> dict[str, Any]:
    text = resources.files("hyperion").joinpath("schedule.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _validator() -> Any:
    """A validator for the schema, built once. The schema itself is checked against its
    metaschema by the tests, not on every load (that took longer than the validation).

    jsonschema rather than fastjsonschema (which compiles the schema to Python): the
    latter validated BERT-base's 765 KB schedule in 15 ms against 267 ms, but compiling
    the schema raised the process's peak RSS by 11 MiB against 4 MiB -- RSS counted
    against a memory cap, where the time is not."""
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def validate(data: Any, label: str) -> None:
    """Check ``data`` against the JSON Schema; another format version is refused first,
    with what to do about it, rather than as a list of unknown fields."""
    from jsonschema.exceptions import best_match

    _check_depth(data, label)
    _check_version(data, label)
    error = best_match(_validator().iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise ScheduleError(f"{label}: not a valid Hyperion schedule at {where}: {error.message}")


def _check_depth(data: Any, label: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH, before anything recurses into it."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ScheduleError(f"{label}: not a valid Hyperion schedule: JSON nested deeper than {MAX_JSON_DEPTH}")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, Mapping | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, Mapping | list))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def _check_version(data: Any, label: str) -> None:
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        return  # the schema names what is wrong
    version = data.get("version")
    if not isinstance(version, int) or version == VERSION:
        return
    if version > VERSION:
        raise ScheduleError(f"{label}: schedule format version {version} is newer than this Hyperion reads "
                            f"({VERSION}); upgrade Hyperion or recompile the model with hyperion compile")
    raise ScheduleError(f"{label}: schedule format version {version} is older than this Hyperion reads "
                        f"({VERSION}); recompile the model with hyperion compile")


def check_consistency(schedule: Schedule, source: ModelSource, label: str = "<schedule>") -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` can run on ``source`` as it says.

    A file that passes the JSON Schema and names the right model (sha256) may still have
    been edited: every step's node must exist in the model with its op type, every tensor
    a step, segment or edge names must be in the tensor table, segments must cover the
    steps in order, every segment's inputs must be available when it runs (not yet freed),
    weights and their external data must be the model's own, and streaming chunks must
    be positive. Checked once on load, before anything runs.
    """
    from onnx import TensorProto

    from hyperion.frontend.build import unique_node_names
    from hyperion.frontend.source import external_location
    from hyperion.frontend.types import dtype_name

    def fail(where: str, what: str) -> None:
        raise ScheduleError(f"{label}: schedule does not match {source.label} at {where}: {what}; "
                            "recompile it with hyperion compile")

    graph = source.proto.graph
    node_ops = dict(zip(unique_node_names(graph.node), (n.op_type for n in graph.node), strict=True))
    initializers = {t.name: t for t in graph.initializer}
    model_inputs = {i.name for i in graph.input} - set(initializers)
    tensors = schedule.tensors
    for name in (*schedule.graph_inputs, *schedule.graph_outputs, *schedule.input_shapes):
        if name not in tensors:
            fail("graph_inputs/graph_outputs", f"tensor {name!r} is not in the tensor table")
    if set(schedule.graph_inputs) != model_inputs:
        fail("graph_inputs", f"{sorted(schedule.graph_inputs)} are not the model's inputs {sorted(model_inputs)}")
    for name in schedule.graph_inputs:
        if tensors[name].dtype not in _NON_TENSOR_KINDS and name not in schedule.input_shapes:
            fail("input_shapes", f"input {name!r} has no shape")
    # A re-planned schedule's outputs are what its prefix hands on; the run returns replan.outputs.
    returned = schedule.graph_outputs if schedule.replan is None else schedule.replan.outputs
    if set(returned) - {o.name for o in graph.output}:
        fail("graph_outputs", "names an output the model does not have")
    for name, record in tensors.items():
        if record.name != name:
            fail(f"tensors/{name}", f"the record is named {record.name!r}")
        for node in (record.producer, *record.consumers):
            if node is not None and node not in node_ops:
                fail(f"tensors/{name}", f"node {node!r} is not in the model")
        if record.role is TensorRole.WEIGHT or record.external is not None:
            init = initializers.get(name)
            if init is None:
                fail(f"tensors/{name}", "a weight the model does not have")
            elif dtype_name(init.data_type) != record.dtype or tuple(init.dims) != tuple(record.shape or ()):
                fail(f"tensors/{name}", f"dtype/shape {record.dtype}{list(record.shape or ())} differ from the "
                                        f"model's {dtype_name(init.data_type)}{list(init.dims)}")
            elif record.external is not None and init.data_location == TensorProto.EXTERNAL:
                located = external_location(source, init)  # contained in the model's folder, or refused
                if (located.path, located.offset, located.length) != (
                        record.external.path, record.external.offset, record.external.length):
                    fail(f"tensors/{name}/external", f"{record.external.path} is not where the model keeps it")
        value_type = record.value_type
        while value_type is not None:
            if value_type.elem_type is not None and value_type.elem_type not in TensorProto.DataType.keys():
                fail(f"tensors/{name}/value_type", f"unknown element type {value_type.elem_type!r}")
            value_type = value_type.element
    for position, step in enumerate(schedule.steps):
        where = f"steps/{position}"
        if step.index != position:
            fail(where, f"index {step.index}")
        if node_ops.get(step.node) is None:
            fail(where, f"node {step.node!r} is not in the model")
        if node_ops[step.node] != step.op_type:
            fail(where, f"node {step.node!r} is a {node_ops[step.node]}, not a {step.op_type}")
        if not 0 <= step.segment < len(schedule.segments):
            fail(where, f"segment {step.segment} does not exist")
        for name in (*step.inputs, *step.outputs, *step.frees, *step.loads, *step.evicts):
            if name not in tensors:
                fail(where, f"tensor {name!r} is not in the tensor table")
        if step.row_gather is not None:
            _check_row_gather(step, schedule, initializers, fail)
        if step.tiles is not None:
            _check_tiles(step, schedule, initializers, fail)
    next_step = 0
    for position, segment in enumerate(schedule.segments):
        where = f"segments/{position}"
        if segment.index != position:
            fail(where, f"index {segment.index}")
        if segment.first_step != next_step or not segment.first_step <= segment.last_step < len(schedule.steps):
            fail(where, f"steps {segment.first_step}..{segment.last_step} do not follow on from step {next_step} "
                        f"within the {len(schedule.steps)} steps")
        if any(schedule.steps[i].segment != position for i in segment.steps):
            fail(where, "a step in its range names another segment")
        next_step = segment.last_step + 1
        for name in (*segment.inputs, *segment.outputs, *segment.weights, *segment.inlined_constants):
            if name not in tensors:
                fail(where, f"tensor {name!r} is not in the tensor table")
        for name in segment.weights:
            if name not in initializers:
                fail(where, f"weight {name!r} is not a weight of the model")
        for name in segment.inlined_constants:
            if tensors[name].producer not in node_ops:
                fail(where, f"inlined constant {name!r} has no producing node in the model")
        if segment.region is not None:
            _check_region(segment, schedule, fail)
    if schedule.steps and next_step != len(schedule.steps):
        fail("segments", f"steps {next_step}.. belong to no segment")
    for position, edge in enumerate(schedule.edges):
        if edge.src not in node_ops or edge.dst not in node_ops or edge.tensor not in tensors:
            fail(f"edges/{position}", f"{edge.src} -> {edge.dst} ({edge.tensor}) names a node or tensor that is "
                                      "not there")
    if schedule.replan is not None:
        for point in schedule.replan.points:
            if point.tensor not in tensors or not -1 <= point.step < len(schedule.steps):
                fail("replan/points", f"tensor {point.tensor!r} at step {point.step} is not in the schedule")
        for node in schedule.replan.suffix_nodes:
            if node not in node_ops:
                fail("replan/suffix_nodes", f"node {node!r} is not in the model")
    if schedule.whole_model and len(schedule.segments) != 1:
        fail("whole_model", f"a whole-model schedule has one segment, not {len(schedule.segments)}")
    _check_dataflow(schedule, fail)
    streaming = schedule.streaming
    if streaming is not None:
        if streaming.chunk < 1 or streaming.batch_size < streaming.chunk:
            fail("streaming", f"chunks of {streaming.chunk} of a batch of {streaming.batch_size}")
        for name in streaming.batched_inputs:
            shape = schedule.input_shapes.get(name)
            if name not in schedule.graph_inputs or not shape or shape[0] != streaming.batch_size:
                fail("streaming", f"batched input {name!r} does not have the batch's {streaming.batch_size} rows")


_NON_TENSOR_KINDS = frozenset({"sequence", "optional", "map", "sparse_tensor"})


def _check_region(segment: Segment, schedule: Schedule, fail: Any) -> None:
    """A region's tiles cover its axis in order; it slices only its inputs and writes every
    output along an axis of that length."""
    from itertools import pairwise

    where, region = f"segments/{segment.index}/region", segment.region
    assert region is not None
    bounds = region.bounds
    if bounds[0] != 0 or bounds[-1] != region.size or any(a >= b for a, b in pairwise(bounds)):
        fail(where, f"bounds {list(bounds)} do not cover the axis of {region.size} in order")
    if set(region.outputs) != set(segment.outputs) or not set(region.sliced) <= set(segment.model_inputs):
        fail(where, "sliced inputs or outputs are not the segment's")
    # A spatial region's inputs have rows of their own (checked with its patches).
    sized = region.outputs.items() if region.patches is not None else (*region.sliced.items(), *region.outputs.items())
    for name, axis in sized:
        shape = schedule.tensors[name].shape or ()
        if not (0 <= axis < len(shape) and shape[axis] == region.size):
            fail(where, f"{name!r} has no axis {axis} of {region.size}")
    if any(schedule.steps[i].row_gather is not None or schedule.steps[i].tiles is not None for i in segment.steps):
        fail(where, "a region holds a step run by Hyperion itself")
    if region.patches is not None:
        _check_patches(region, region.patches, schedule, f"{where}/patches", fail)


def _check_patches(region: Region, patches: Patches, schedule: Schedule, where: str, fail: Any) -> None:
    """Every patch is fed rows inside each sliced input, padded and cropped once per patch,
    each crop inside what its tensor can hold; the outputs are cut at ``bounds``."""
    count = len(region.bounds) - 1
    if set(patches.rows) != set(region.sliced):
        fail(where, "rows are not given for exactly the sliced inputs")
    for name, rows in patches.rows.items():
        size = (schedule.tensors[name].shape or ())[region.sliced[name]]
        if len(rows) != count or any(not 0 <= a < b <= size for a, b in rows):  # type: ignore[operator]
            fail(where, f"the rows of {name!r} are not {count} ranges inside its {size} rows")
    for pad in patches.pads:
        if len(pad.rows) != count or any(a < 0 or b < 0 for a, b in pad.rows) or len(pad.shape) != 4:
            fail(where, f"the padding of node {pad.node!r} is not {count} pairs of rows of a 4-D tensor")
    for crop in patches.crops:
        limit = (schedule.tensors[crop.tensor].shape or ())[crop.axis] if crop.tensor in schedule.tensors else None
        if len(crop.rows) != count or any(not 0 <= a < b for a, b in crop.rows) \
                or (isinstance(limit, int) and any(b > limit for _, b in crop.rows)):
            fail(where, f"the crop of {crop.tensor!r} for {crop.reader or 'the output'!r} is not {count} ranges "
                        "inside the tensor")


def _check_row_gather(step: Step, schedule: Schedule, initializers: Mapping[str, Any], fail: Any) -> None:
    """A row gather reads its node's table and indices, within the table, alone in its segment."""
    import numpy as np

    where, gather = f"steps/{step.index}/row_gather", step.row_gather
    assert gather is not None
    if step.op_type != "Gather" or (gather.weight, gather.indices) != step.inputs or (gather.output,) != step.outputs:
        fail(where, f"does not match node {step.node!r}'s inputs and output")
    init = initializers.get(gather.weight)
    record = schedule.tensors.get(gather.weight)
    if init is None or record is None or record.role is not TensorRole.WEIGHT:
        fail(where, f"table {gather.weight!r} is not a weight of the model")
    table_bytes = int(np.prod(init.dims, dtype=np.int64)) * np.dtype(record.dtype).itemsize
    if not init.dims or gather.rows != init.dims[0] or gather.rows * gather.row_bytes != table_bytes:
        fail(where, f"{gather.rows} rows of {gather.row_bytes} bytes are not the table {gather.weight!r}")
    segment = schedule.segments[step.segment] if step.segment < len(schedule.segments) else None
    if segment is None or segment.first_step != segment.last_step:
        fail(where, "a row gather is a segment of its own")


def _check_tiles(step: Step, schedule: Schedule, initializers: Mapping[str, Any], fail: Any) -> None:
    """Tiles slice their node's float32 weight within its shape, cover the output axis in
    order, fit their buffer, and are a segment of their own."""
    import math
    from itertools import pairwise

    where, tiles = f"steps/{step.index}/tiles", step.tiles
    assert tiles is not None
    if tiles.weight not in step.inputs or (tiles.bias is not None and tiles.bias not in step.inputs) \
            or (tiles.output,) != step.outputs:
        fail(where, f"does not match node {step.node!r}'s inputs and output")
    if tiles.weight not in initializers or schedule.tensors[tiles.weight].dtype != "float32":
        fail(where, f"{tiles.weight!r} is not a float32 weight of the model")
    dims = tuple(initializers[tiles.weight].dims)
    output = schedule.tensors[tiles.output].shape or ()
    if not ((tiles.weight_axis == 0 and dims) or (tiles.weight_axis == 1 and len(dims) == 2)) \
            or not tiles.output_axis < len(output):
        fail(where, f"weight axis {tiles.weight_axis} or output axis {tiles.output_axis} cannot be tiled")
    bounds = tiles.bounds
    if bounds[0] != 0 or bounds[-1] != dims[tiles.weight_axis] or any(a >= b for a, b in pairwise(bounds)):
        fail(where, f"bounds do not cover the {dims[tiles.weight_axis]} of {tiles.weight!r} in order")
    bias_shape = () if tiles.bias is None else schedule.tensors[tiles.bias].shape or ()
    if tiles.bias is not None and (not all(isinstance(d, int) for d in bias_shape)
                                   or math.prod(bias_shape) != dims[tiles.weight_axis]):  # type: ignore[arg-type]
        fail(where, f"bias {tiles.bias!r} does not have one value per tile column")
    widest = max(b - a for a, b in pairwise(bounds))
    if 4 * math.prod(dims) // dims[tiles.weight_axis] * widest + tiles.skip_bytes > tiles.staging_bytes:
        fail(where, f"a tile {widest} wide and skip_bytes {tiles.skip_bytes} do not fit staging_bytes "
                    f"{tiles.staging_bytes}")
    narrowest = min(b - a for a, b in pairwise(bounds))
    if tiles.skip_bytes and (tiles.weight_axis != 1 or tiles.skip_bytes < 4 * (dims[-1] - narrowest)):
        fail(where, f"skip_bytes {tiles.skip_bytes} is not a buffer for the bytes between column tiles")
    if tiles.tile_major and tiles.weight_axis != 1:
        fail(where, "only column tiles (weight_axis 1) are read from a tile-major copy")
    if tiles.relaid and tiles.fed:
        fail(where, "relaid tiles are not fed: each is packed into a file its own session maps")
    segment = schedule.segments[step.segment] if step.segment < len(schedule.segments) else None
    if segment is None or segment.first_step != segment.last_step:
        fail(where, "a tiled step is a segment of its own")


def _check_dataflow(schedule: Schedule, fail: Any) -> None:
    """Every segment's inputs are available when it runs (as the runtime holds tensors)."""
    if schedule.whole_model:
        return
    available = set(schedule.graph_inputs)
    for segment in schedule.segments:
        missing = [name for name in segment.inputs if name not in available]
        if missing:
            fail(f"segments/{segment.index}", f"input {missing[0]!r} is produced by no earlier segment, "
                                              "or freed before")
        available.update(segment.outputs)
        for step in segment.steps:
            available.difference_update(schedule.steps[step].frees)
    weights = {n for n, t in schedule.tensors.items() if t.role is TensorRole.WEIGHT}
    for name in schedule.graph_outputs:
        if name not in available and name not in weights:
            fail("graph_outputs", f"output {name!r} is produced by no segment")


__all__ = ["FORMAT", "VERSION", "EdgeRecord", "ModelRef", "Observe", "PatchCrop", "PatchPad", "Patches", "Replan",
           "ReplanPoint", "RowGather", "Region", "Schedule", "ScheduleError", "Segment", "Step", "Streaming",
           "TensorRecord", "Tiles", "ValueType",
           "check_consistency", "schema", "validate", "write_atomic"]
