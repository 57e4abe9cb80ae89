"""hyperion.load runs a saved schedule as it is: outputs equal onnxruntime's in every mode,
and loading and running import no graph, run no shape inference and no pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import pytest

import hyperion
import hyperion.api
import hyperion.frontend.build
import hyperion.frontend.symbolic
import hyperion.passes
from tests.conftest import assert_outputs_equal, example_feeds, fixture_path, reference_outputs
from tests.test_runtime import SEQUENCES_AND_OPTIONALS
from tests.test_streaming import cap_for_chunk


def _shapes(feeds: dict[str, Any]) -> dict[str, list[int]]:
    return {name: list(np.shape(value)) for name, value in feeds.items()}


def _forbid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make import, shape inference, the planner and every pass raise."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load ran what the schedule already says")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    monkeypatch.setattr(hyperion.frontend.symbolic, "infer_symbolic", refuse)
    monkeypatch.setattr(hyperion.passes.PassManager, "__call__", refuse)
    for module in (hyperion.api, hyperion.frontend.build, hyperion.frontend):
        monkeypatch.setattr(module, "import_model", refuse)
    monkeypatch.setattr(hyperion.api, "plan", refuse)


CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    # name: (fixture, compile options, batch)
    "normal, whole model": ("demo", {}, 1),
    "memory_opt under a cap": ("demo", {"memory_limit": "1.5MB"}, 1),
    "adaptive under half the peak": ("transformer_block", {"memory_limit": "half"}, 1),
    "one node per segment": ("mlp", {"max_segment_steps": 1, "whole_model_shortcut": False}, 1),
    "control flow per node": ("control_flow", {"max_segment_steps": 1, "whole_model_shortcut": False}, 1),
    "contrib op, estimated types": ("seed_attention", {"max_segment_steps": 1, "whole_model_shortcut": False}, 1),
    "external data, memory_opt": ("external_data", {"memory_limit": "700KB", "mode": "memory_opt"}, 1),
    "streaming": ("dynamic_dims", {"memory_limit": "chunk of 4", "mode": "streaming"}, 8),
}


def _compiled(name: str, options: dict[str, Any], batch: int) -> tuple[hyperion.CompiledModel, dict[str, Any]]:
    feeds = example_feeds(name, batch=batch)
    options = dict(options)
    if options.get("memory_limit") == "half":
        options["memory_limit"] = hyperion.compile(fixture_path(name)).schedule.peak_bytes // 2
    elif options.get("memory_limit") == "chunk of 4":
        options["memory_limit"] = cap_for_chunk(name, batch, 4)
    return hyperion.compile(fixture_path(name), input_shapes=_shapes(feeds), **options), feeds


@pytest.mark.parametrize("case", list(CASES))
def test_a_loaded_schedule_runs_as_saved_without_import_inference_or_passes(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, options, batch = CASES[case]
    compiled, feeds = _compiled(name, options, batch)
    saved = compiled.schedule.save(tmp_path / "s.json")
    expected = reference_outputs(fixture_path(name), feeds)
    _forbid(monkeypatch)
    with pytest.raises(AssertionError, match="already says"):
        hyperion.compile(fixture_path(name), input_shapes=_shapes(feeds))   # the guard works
    loaded = hyperion.load(fixture_path(name), saved)
    assert loaded.schedule == compiled.schedule
    for _ in range(2):   # kept sessions and the second run's prefetch too
        assert_outputs_equal(loaded.run(feeds), expected)
    assert loaded.stats.peak_bytes <= (loaded.schedule.memory_limit or loaded.stats.peak_bytes)


def test_a_streaming_schedule_is_loaded_in_its_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled, feeds = _compiled("dynamic_dims", {"memory_limit": "chunk of 4", "mode": "streaming"}, 8)
    saved = compiled.schedule.save(tmp_path / "s.json")
    _forbid(monkeypatch)
    loaded = hyperion.load(fixture_path("dynamic_dims"), saved)
    loaded.run(feeds)
    assert loaded.schedule.mode == "streaming" and loaded.stats.chunks == 2


def test_sequences_and_optionals_cross_segments_of_a_loaded_schedule(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnx.parser.parse_model(SEQUENCES_AND_OPTIONALS)
    compiled = hyperion.compile(model, max_segment_steps=1, whole_model_shortcut=False)
    saved = compiled.schedule.save(tmp_path / "s.json")
    feeds = {"s": [np.ones(2, np.float32), np.full(2, 2, np.float32)], "o": np.full(2, 7, np.float32),
             "x": np.array([3, 4], np.float32)}
    expected = compiled.run(feeds)
    assert compiled.schedule.tensors["t"].value_type.kind == "sequence"
    _forbid(monkeypatch)
    assert_outputs_equal(hyperion.load(model, saved).run(feeds), expected)


def test_the_graph_of_a_loaded_model_is_imported_on_first_access(tmp_path: Path) -> None:
    compiled = hyperion.compile(fixture_path("transformer_block"))
    saved = compiled.schedule.save(tmp_path / "s.json")
    loaded = hyperion.load(fixture_path("transformer_block"), saved)
    assert loaded._active().imported is None                  # nothing imported to run
    kinds = {(u, v, d["tensor"]): d["kind"] for u, v, d in loaded.graph.edges(data=True)}
    assert kinds == {(u, v, d["tensor"]): d["kind"] for u, v, d in compiled.graph.edges(data=True)}
    assert set(kinds.values()) >= {"attention", "residual", "sequential"}


def test_new_input_shapes_of_a_loaded_model_are_planned_on_first_use(tmp_path: Path) -> None:
    small = example_feeds("dynamic_dims", batch=2)
    compiled = hyperion.compile(fixture_path("dynamic_dims"), input_shapes=_shapes(small))
    loaded = hyperion.load(fixture_path("dynamic_dims"), compiled.schedule.save(tmp_path / "s.json"))
    larger = example_feeds("dynamic_dims", batch=3)
    assert_outputs_equal(loaded.run(larger), reference_outputs(fixture_path("dynamic_dims"), larger))
    assert loaded.schedule.input_shapes != compiled.schedule.input_shapes
    assert_outputs_equal(loaded.run(small), reference_outputs(fixture_path("dynamic_dims"), small))


def test_the_cli_runs_a_saved_schedule_on_random_inputs_without_importing_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperion.tools.cli import main

    model, schedule = fixture_path("unet"), tmp_path / "unet.schedule.json"
    assert main(["compile", str(model), "--memory-limit", "300KB", "-o", str(schedule)]) == 0
    _forbid(monkeypatch)
    # Random inputs come from the schedule's input records, not from an imported graph.
    assert main(["run", str(model), "--schedule", str(schedule), "--seed", "0", "--quiet"]) == 0
