"""The schedule file: round trip, byte-identical output, schema validation, model check, and a
format described in full (dataclasses, JSON Schema and docs/schedule_format.md agree)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import onnx
import pytest

import hyperion
from hyperion.ir import ExecutionMode, ExternalLocation
from hyperion.planner.emit import value_type
from hyperion.runtime.segment_model import type_proto
from hyperion.schedule import (
    VERSION,
    EdgeRecord,
    ModelRef,
    PatchCrop,
    Patches,
    PatchPad,
    Region,
    Replan,
    ReplanPoint,
    RowGather,
    Schedule,
    Segment,
    Step,
    Streaming,
    TensorRecord,
    Tiles,
    ValueType,
    _plain,
    schema,
)
from tests.conftest import assert_outputs_equal, example_feeds, fixture_path, reference_outputs


@pytest.fixture(scope="module")
def capped() -> hyperion.CompiledModel:
    path = fixture_path("transformer_block")
    peak = hyperion.compile(path).schedule.peak_bytes
    return hyperion.compile(path, memory_limit=peak // 2)


def test_round_trip_preserves_every_field(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    path = capped.schedule.save(tmp_path / "s.json")
    assert Schedule.load(path) == capped.schedule


def test_same_model_and_options_give_byte_identical_files(tmp_path: Path) -> None:
    texts = []
    for i in range(2):
        cm = hyperion.compile(fixture_path("unet"), memory_limit="300KB")
        texts.append(cm.schedule.save(tmp_path / f"{i}.json").read_bytes())
    assert texts[0] == texts[1]
    data = json.loads(texts[0])
    assert data["format"] == "hyperion.schedule" and data["memory_limit"] == 300_000
    assert list(data) == sorted(data)  # sorted keys


def test_save_is_atomic_and_leaves_no_temporary_files(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    target.write_text("previous")
    capped.schedule.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    assert json.loads(target.read_text())["format"] == "hyperion.schedule"


def test_loaded_schedule_runs_and_matches_onnxruntime(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    path = capped.schedule.save(tmp_path / "s.json")
    model = fixture_path("transformer_block")
    loaded = hyperion.load(model, path)
    assert loaded.schedule == capped.schedule
    feeds = example_feeds("transformer_block")
    assert_outputs_equal(loaded.run(feeds), reference_outputs(model, feeds))


def test_load_refuses_a_schedule_of_another_model(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    path = capped.schedule.save(tmp_path / "s.json")
    with pytest.raises(hyperion.ScheduleError, match="another model"):
        hyperion.load(fixture_path("mlp"), path)


def _edited(capped: hyperion.CompiledModel, tmp_path: Path, **changes: object) -> Path:
    data = capped.schedule.to_dict()
    data.update(changes)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def test_newer_format_version_is_refused(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    with pytest.raises(hyperion.ScheduleError, match="newer"):
        Schedule.load(_edited(capped, tmp_path, version=99))


def test_schema_violations_name_the_place(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    with pytest.raises(hyperion.ScheduleError, match="peak_bytes"):
        Schedule.load(_edited(capped, tmp_path, peak_bytes=-5))
    with pytest.raises(hyperion.ScheduleError, match="mode"):
        Schedule.load(_edited(capped, tmp_path, mode="turbo"))


def test_not_json_and_missing_files_are_schedule_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(hyperion.ScheduleError, match="invalid JSON"):
        Schedule.load(bad)
    with pytest.raises(hyperion.ScheduleError, match="no such schedule"):
        Schedule.load(tmp_path / "missing.json")


# -- the format is described in full: dataclasses, JSON Schema and docs agree ----------------
DOC = Path(__file__).resolve().parents[1] / "docs" / "schedule_format.md"
# record -> (its JSON Schema as a path into the schema, its section of docs/schedule_format.md)
RECORDS: dict[type, tuple[tuple[str, ...], str]] = {
    Schedule: ((), "Top level"),
    ModelRef: (("properties", "model"), "Model"),
    TensorRecord: (("$defs", "tensor"), "Tensor"),
    ExternalLocation: (("$defs", "tensor", "properties", "external"), "External data"),
    ValueType: (("$defs", "value_type"), "Value type"),
    Step: (("$defs", "step"), "Step"),
    Segment: (("$defs", "segment"), "Segment"),
    EdgeRecord: (("$defs", "edge"), "Edge"),
    Streaming: (("$defs", "streaming"), "Streaming"),
    Replan: (("$defs", "replan"), "Replan"),
    ReplanPoint: (("$defs", "replan_point"), "Replan point"),
    RowGather: (("$defs", "row_gather"), "Row gather"),
    Tiles: (("$defs", "tiles"), "Tiles"),
    Region: (("$defs", "region"), "Region"),
    Patches: (("$defs", "patches"), "Patches"),
    PatchPad: (("$defs", "patches", "properties", "pads", "items"), "Patch pad"),
    PatchCrop: (("$defs", "patches", "properties", "crops", "items"), "Patch crop"),
}

# Fields a file may leave out (absent means None); every other field is required.
OPTIONAL: dict[type, set[str]] = {Schedule: {"optimal_peak_bytes", "replan", "kept_heap_bytes"},
                                  TensorRecord: {"upper_bound"}, Segment: {"fold_constants", "relaid", "region"},
                                  Step: {"row_gather", "tiles"}, Tiles: {"fed", "relaid", "skip_bytes", "tile_major"},
                                  Region: {"patches"}}


def _nested_records(record: type) -> set[type]:
    """The record types ``record``'s fields hold (the dataclasses among their annotations)."""
    by_name = {cls.__name__: cls for cls in (ModelRef, TensorRecord, ExternalLocation, ValueType, Step, Segment,
                                             EdgeRecord, Streaming, Replan, ReplanPoint, RowGather, Tiles, Region,
                                             Patches, PatchPad, PatchCrop)}
    return {cls for f in dataclasses.fields(record) for name, cls in by_name.items() if name in str(f.type)}


def _doc_fields(section: str) -> set[str]:
    """The backticked names in the first column of the table under ``## section``."""
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return {m for line in body.splitlines() if line.startswith("| `")
            for m in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])}


def test_every_record_of_the_schedule_is_described() -> None:
    found, todo = set(), [Schedule]
    while todo:
        record = todo.pop()
        found.add(record)
        todo.extend(_nested_records(record) - found)
    assert found == set(RECORDS)   # a new record needs a schema and a docs section here


@pytest.mark.parametrize("record", list(RECORDS), ids=lambda r: r.__name__)
def test_schema_and_docs_list_exactly_the_dataclass_fields(record: type) -> None:
    path, section = RECORDS[record]
    node = schema()
    for key in path:
        node = node[key]
    fields = {f.name for f in dataclasses.fields(record)}
    assert set(node["properties"]) == fields, "schema properties"
    assert set(node["required"]) == fields - OPTIONAL.get(record, set()), "schema required"
    assert node["additionalProperties"] is False
    assert _doc_fields(section) == fields, f"docs/schedule_format.md, section {section!r}"


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())   # loading skips this check


def test_the_docs_schema_is_the_package_schema_file() -> None:
    docs = DOC.parent / "schedule.schema.json"
    assert docs.resolve() == (Path(hyperion.__file__).parent / "schedule.schema.json").resolve()
    assert f'"version": {{"const": {VERSION}}}' in docs.read_text()


def _edited_segment(capped: hyperion.CompiledModel, tmp_path: Path, **changes: object) -> Path:
    data = capped.schedule.to_dict()
    data["segments"][0].update(changes)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def test_unknown_fields_are_refused_at_every_level(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    with pytest.raises(hyperion.ScheduleError, match="top level.*'extra'"):
        Schedule.load(_edited(capped, tmp_path, extra={"prefetch": True}))   # version 1's free-form object
    with pytest.raises(hyperion.ScheduleError, match="segments/0.*'keep'"):
        Schedule.load(_edited_segment(capped, tmp_path, keep=True))
    data = capped.schedule.to_dict()
    name = next(n for n, t in data["tensors"].items() if t["value_type"] is not None)
    data["tensors"][name]["value_type"]["rank"] = 2
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(hyperion.ScheduleError, match=f"tensors/{name}/value_type"):
        Schedule.load(tmp_path / "t.json")


def test_wrong_types_and_missing_fields_are_refused(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    with pytest.raises(hyperion.ScheduleError, match="prefetch"):
        Schedule.load(_edited(capped, tmp_path, prefetch="yes"))
    with pytest.raises(hyperion.ScheduleError, match="segments/0/cached"):
        Schedule.load(_edited_segment(capped, tmp_path, cached=1))
    with pytest.raises(hyperion.ScheduleError, match="streaming"):
        Schedule.load(_edited(capped, tmp_path, streaming={"batch_size": 8, "chunk": 0, "batched_inputs": [],
                                                           "bytes_per_sample": 4}))
    data = capped.schedule.to_dict()
    del data["whole_model"]
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(hyperion.ScheduleError, match="'whole_model' is a required property"):
        Schedule.load(tmp_path / "m.json")


def test_model_inputs_must_be_the_inputs_less_the_inlined_constants(capped: hyperion.CompiledModel,
                                                                    tmp_path: Path) -> None:
    segment = capped.schedule.segments[1]
    assert segment.inputs
    with pytest.raises(hyperion.ScheduleError, match="model_inputs"):
        Schedule.load(_edited_segment(capped, tmp_path, model_inputs=[]))


def test_a_version_1_schedule_says_to_recompile(capped: hyperion.CompiledModel, tmp_path: Path) -> None:
    data = capped.schedule.to_dict()
    data.update(version=1, extra={"prefetch": True})
    (tmp_path / "v1.json").write_text(json.dumps(data))
    with pytest.raises(hyperion.ScheduleError, match="version 1 is older.*recompile the model with hyperion compile"):
        hyperion.load(fixture_path("transformer_block"), tmp_path / "v1.json")


def test_modes_are_enums_in_python_and_strings_in_json(capped: hyperion.CompiledModel) -> None:
    schedule = capped.schedule
    assert schedule.mode is ExecutionMode.MEMORY_OPT and schedule.requested_mode is ExecutionMode.ADAPTIVE
    data = json.loads(schedule.to_json())
    assert (data["mode"], data["requested_mode"]) == ("memory_opt", "adaptive")


TYPES = {
    "tensor with dims, names and unknowns": onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT,
                                                                                [2, "n", None]),
    "tensor of unknown rank": onnx.helper.make_tensor_type_proto(onnx.TensorProto.INT64, None),
    "scalar": onnx.helper.make_tensor_type_proto(onnx.TensorProto.BOOL, []),
    "bfloat16": onnx.helper.make_tensor_type_proto(onnx.TensorProto.BFLOAT16, [3]),
    "sequence": onnx.helper.make_sequence_type_proto(onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT,
                                                                                        ["k"])),
    "optional sequence": onnx.helper.make_optional_type_proto(onnx.helper.make_sequence_type_proto(
        onnx.helper.make_tensor_type_proto(onnx.TensorProto.INT32, None))),
    "map": onnx.helper.make_map_type_proto(onnx.TensorProto.STRING,
                                           onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])),
    "sparse tensor": onnx.helper.make_sparse_tensor_type_proto(onnx.TensorProto.FLOAT, [4, 4]),
}


@pytest.mark.parametrize("name", list(TYPES))
def test_value_types_round_trip_to_the_same_onnx_type(name: str) -> None:
    record = value_type(TYPES[name])
    assert record is not None
    as_json = json.loads(json.dumps(_plain(dataclasses.asdict(record))))
    jsonschema.validate(as_json, {**schema()["$defs"]["value_type"], "$defs": schema()["$defs"]})
    assert type_proto(record) == TYPES[name]


def test_steps_free_each_tensor_once_and_never_an_output(capped: hyperion.CompiledModel) -> None:
    schedule = capped.schedule
    freed = [t for step in schedule.steps for t in step.frees]
    assert len(freed) == len(set(freed))
    assert not set(freed) & set(schedule.graph_outputs)
    produced_or_input = {t for s in schedule.steps for t in s.outputs} | set(schedule.graph_inputs)
    assert set(freed) <= produced_or_input
