"""The schedule file: round trip, byte-identical output, schema validation, model check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hyperion
from hyperion.schedule import Schedule
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


def test_schema_in_docs_is_the_one_the_package_validates_with() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "schedule.schema.json"
    from hyperion.schedule import schema

    assert json.loads(docs.read_text()) == schema()


def test_steps_free_each_tensor_once_and_never_an_output(capped: hyperion.CompiledModel) -> None:
    schedule = capped.schedule
    freed = [t for step in schedule.steps for t in step.frees]
    assert len(freed) == len(set(freed))
    assert not set(freed) & set(schedule.graph_outputs)
    produced_or_input = {t for s in schedule.steps for t in s.outputs} | set(schedule.graph_inputs)
    assert set(freed) <= produced_or_input
