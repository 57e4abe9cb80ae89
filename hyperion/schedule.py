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
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from hyperion.errors import ScheduleError
from hyperion.ir import EdgeKind, ExecutionMode, ExternalLocation, TensorRole

FORMAT = "hyperion.schedule"
# Bumped whenever a field is added, removed or changes meaning; a file of another
# version is refused with a message saying what to do (see docs/schedule_format.md).
VERSION = 2

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
    format: str = FORMAT
    version: int = VERSION

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
        """Write atomically: a temporary file in the same folder, then a rename."""
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
            steps=tuple(Step(**_tuples(s)) for s in data["steps"]),
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
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ScheduleError(f"{path}: no such schedule file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ScheduleError(f"{path}: not a schedule file (invalid JSON: {exc})") from None
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


def _tensor(data: Mapping[str, Any]) -> TensorRecord:
    external, value_type = data["external"], data["value_type"]
    return TensorRecord(
        name=data["name"], dtype=data["dtype"], shape=None if data["shape"] is None else tuple(data["shape"]),
        bytes=data["bytes"], role=TensorRole(data["role"]), producer=data["producer"],
        consumers=tuple(data["consumers"]), external=None if external is None else ExternalLocation(**external),
        value_type=None if value_type is None else _value_type(value_type))


def _value_type(data: Mapping[str, Any]) -> ValueType:
    element = data["element"]
    return ValueType(kind=data["kind"], elem_type=data["elem_type"],
                     shape=None if data["shape"] is None else tuple(data["shape"]),
                     element=None if element is None else _value_type(element))


def _segment(data: Mapping[str, Any], label: str) -> Segment:
    segment = Segment(**_tuples(data))
    inlined = set(segment.inlined_constants)
    if segment.model_inputs != tuple(n for n in segment.inputs if n not in inlined):
        raise ScheduleError(f"{label}: not a valid Hyperion schedule at segments/{segment.index}: model_inputs "
                            "must be inputs less inlined_constants, in order")
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
    metaschema by the tests, not on every load (that took longer than the validation)."""
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def validate(data: Any, label: str) -> None:
    """Check ``data`` against the JSON Schema; another format version is refused first,
    with what to do about it, rather than as a list of unknown fields."""
    from jsonschema.exceptions import best_match

    _check_version(data, label)
    error = best_match(_validator().iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise ScheduleError(f"{label}: not a valid Hyperion schedule at {where}: {error.message}")


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


def write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["FORMAT", "VERSION", "EdgeRecord", "ModelRef", "Schedule", "ScheduleError", "Segment",
           "Step", "Streaming", "TensorRecord", "ValueType", "schema", "validate", "write_atomic"]
