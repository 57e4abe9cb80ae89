"""The schedule: the compiled plan as plain, frozen data, saved and loaded as JSON.

The runtime reads a schedule; it never re-derives the plan. The same model and
options give byte-identical files (sorted keys, a stable order of records).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from hyperion.errors import ScheduleError

FORMAT = "hyperion.schedule"
VERSION = 1


@dataclass(frozen=True)
class ModelRef:
    path: str | None
    sha256: str
    opset: int


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int | str, ...] | None
    bytes: int | None
    role: str
    producer: str | None
    consumers: tuple[str, ...]
    external: Mapping[str, Any] | None = None   # {"path", "offset", "length"}


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

    @property
    def steps(self) -> range:
        return range(self.first_step, self.last_step + 1)


@dataclass(frozen=True)
class EdgeRecord:
    src: str
    dst: str
    tensor: str
    kind: str


@dataclass(frozen=True)
class Schedule:
    model: ModelRef
    mode: str
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
    requested_mode: str = "normal"
    mode_reason: str = ""
    batch_chunk: int | None = None     # streaming: samples per chunk
    optimal_peak_bytes: int | None = None  # proven minimum over all orders (one step per segment)
    format: str = FORMAT
    version: int = VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

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
        return cls(
            model=ModelRef(**data["model"]),
            mode=data["mode"],
            memory_limit=data["memory_limit"],
            peak_bytes=data["peak_bytes"],
            lower_bound_bytes=data["lower_bound_bytes"],
            arena_bytes=data["arena_bytes"],
            input_shapes={k: tuple(v) for k, v in data["input_shapes"].items()},
            tensors={k: TensorRecord(**{**v, "shape": _tuple_or_none(v["shape"]),
                                        "consumers": tuple(v["consumers"])})
                     for k, v in data["tensors"].items()},
            steps=tuple(Step(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                        for s in data["steps"]),
            segments=tuple(Segment(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                           for s in data["segments"]),
            edges=tuple(EdgeRecord(**e) for e in data["edges"]),
            graph_inputs=tuple(data["graph_inputs"]),
            graph_outputs=tuple(data["graph_outputs"]),
            requested_mode=data["requested_mode"],
            mode_reason=data["mode_reason"],
            batch_chunk=data["batch_chunk"],
            optimal_peak_bytes=data.get("optimal_peak_bytes"),
            extra=data.get("extra", {}),
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

    def edge_kinds(self) -> dict[tuple[str, str, str], str]:
        return {(e.src, e.dst, e.tensor): e.kind for e in self.edges}


def _tuple_or_none(value: Sequence | None) -> tuple | None:
    return None if value is None else tuple(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@cache
def schema() -> dict[str, Any]:
    text = resources.files("hyperion").joinpath("schedule.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate(data: Any, label: str) -> None:
    import jsonschema

    if isinstance(data, Mapping) and data.get("format") == FORMAT and isinstance(data.get("version"), int) \
            and data["version"] > VERSION:
        raise ScheduleError(f"{label}: schedule format version {data['version']} is newer than this "
                            f"Hyperion reads ({VERSION}); upgrade Hyperion or recompile the model")
    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise ScheduleError(f"{label}: not a valid Hyperion schedule at {where}: {exc.message}") from None


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
