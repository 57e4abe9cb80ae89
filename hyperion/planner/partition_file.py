"""A :class:`~hyperion.planner.partition.Partition` saved as files: the stage graph as a small JSON
file, and next to it each stage's ONNX model and its schedule (the ordinary schedule format).

``p.save("m.partition.json")`` writes ``m.partition.json``, ``m.partition.stage0.onnx``,
``m.partition.stage0.schedule.json``, ...; every file atomically, the partition file last.
``load_partition`` refuses (:class:`~hyperion.errors.ScheduleError`) a file of another format
or version, a missing stage file, or a stage schedule that is not of its stage model.
docs/schedule_format.md documents the fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hyperion.digest import sha256
from hyperion.errors import ScheduleError
from hyperion.files import write_atomic
from hyperion.planner.partition import Partition, Stage, StageEdge
from hyperion.schedule import MAX_SCHEDULE_BYTES, ModelRef, Schedule

FORMAT = "hyperion.partition"
VERSION = 1
_STAGE_FIELDS = ("index", "first_step", "last_step", "nodes", "inputs", "outputs", "copied_constants", "weights",
                 "weight_bytes", "activation_bytes", "estimated_ms")


def _stage_files(path: Path, index: int) -> tuple[str, str]:
    stem = path.name.removesuffix(".json")
    return f"{stem}.stage{index}.onnx", f"{stem}.stage{index}.schedule.json"


def save_partition(partition: Partition, path: str | os.PathLike) -> Path:
    target = Path(path)
    stages = []
    for stage in partition.stages:
        model_file, schedule_file = _stage_files(target, stage.index)
        write_atomic(target.with_name(model_file), stage.model)
        stage.schedule.save(target.with_name(schedule_file))
        record = {name: getattr(stage, name) for name in _STAGE_FIELDS}
        stages.append({**record, "model_file": model_file, "schedule_file": schedule_file})
    data = {
        "format": FORMAT, "version": VERSION, "model": vars(partition.model), "base_dir": partition.base_dir,
        "memory_limit_per_stage": partition.memory_limit_per_stage, "balance": partition.balance,
        "input_shapes": partition.input_shapes, "graph_inputs": partition.graph_inputs,
        "graph_outputs": partition.graph_outputs, "free_batch": partition.free_batch, "stages": stages,
        "edges": [vars(edge) for edge in partition.edges]}
    return write_atomic(target, json.dumps(data, sort_keys=True, indent=1) + "\n")


def load_partition(path: str | os.PathLike) -> Partition:
    source = Path(path)
    try:
        if source.stat().st_size > MAX_SCHEDULE_BYTES:
            raise ScheduleError(f"{source}: larger than {MAX_SCHEDULE_BYTES} bytes; not a partition file")
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScheduleError(f"{source}: cannot read the partition file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ScheduleError(f"{source}: not a Hyperion partition file (format {FORMAT!r} expected)")
    if data.get("version") != VERSION:
        raise ScheduleError(f"{source}: partition format version {data.get('version')!r}, this Hyperion reads "
                            f"{VERSION}; partition the model again with hyperion.partition")
    try:
        return Partition(
            model=ModelRef(**data["model"]), base_dir=data["base_dir"],
            memory_limit_per_stage=data["memory_limit_per_stage"], balance=data["balance"],
            input_shapes={k: tuple(v) for k, v in data["input_shapes"].items()},
            graph_inputs=tuple(data["graph_inputs"]), graph_outputs=tuple(data["graph_outputs"]),
            free_batch=bool(data["free_batch"]), stages=tuple(_stage(source, s) for s in data["stages"]),
            edges=tuple(StageEdge(**e) for e in data["edges"]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ScheduleError(f"{source}: malformed partition file ({type(exc).__name__}: {exc})") from None


def _stage(source: Path, record: dict[str, Any]) -> Stage:
    model_path, schedule_path = (source.with_name(Path(record[k]).name) for k in ("model_file", "schedule_file"))
    try:
        model = model_path.read_bytes()
    except OSError as exc:
        raise ScheduleError(f"{source}: stage {record['index']}: cannot read its model {model_path} ({exc})") from None
    schedule = Schedule.load(schedule_path)
    if sha256(model).hexdigest() != schedule.model.sha256:
        raise ScheduleError(f"{schedule_path}: not the schedule of stage model {model_path} (sha256 differs); "
                            "partition the model again")
    fields = {name: tuple(record[name]) if isinstance(record[name], list) else record[name] for name in _STAGE_FIELDS}
    return Stage(**fields, model=model, schedule=schedule)
