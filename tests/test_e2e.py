"""End to end on every fixture: Hyperion's outputs equal plain onnxruntime's, with and without a cap."""

from __future__ import annotations

import numpy as np
import pytest

import hyperion
from tests.conftest import (
    assert_matches_onnxruntime,
    assert_outputs_equal,
    example_feeds,
    fixture_path,
    reference_outputs,
)


def _shapes(feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: value.shape for name, value in feeds.items()}


def test_uncapped_run_is_one_segment_and_matches_onnxruntime(fixture_name: str) -> None:
    feeds = example_feeds(fixture_name)
    cm = hyperion.compile(fixture_path(fixture_name), input_shapes=_shapes(feeds))
    assert len(cm.schedule.segments) == 1
    assert cm.schedule.mode == "normal"
    assert_outputs_equal(cm.run(feeds), reference_outputs(fixture_path(fixture_name), feeds))
    assert cm.stats.peak_bytes == cm.schedule.peak_bytes


def _capped(fixture_name: str, feeds: dict[str, np.ndarray]) -> tuple[hyperion.CompiledModel, int]:
    """Compiled at half the uncapped accounted peak, or at the smallest feasible cap above that."""
    uncapped = hyperion.compile(fixture_path(fixture_name), input_shapes=_shapes(feeds))
    cap = uncapped.schedule.peak_bytes // 2
    try:
        return hyperion.compile(fixture_path(fixture_name), memory_limit=cap, input_shapes=_shapes(feeds)), cap
    except hyperion.MemoryLimitError as exc:
        assert exc.smallest_limit_bytes > cap
        cap = exc.smallest_limit_bytes
        return hyperion.compile(fixture_path(fixture_name), memory_limit=cap, input_shapes=_shapes(feeds)), cap


def test_capped_run_stays_under_the_cap_and_matches_onnxruntime(fixture_name: str) -> None:
    feeds = example_feeds(fixture_name)
    cm, cap = _capped(fixture_name, feeds)
    assert cm.schedule.peak_bytes <= cap
    assert all(step.live_bytes <= cap for step in cm.schedule.steps)
    assert_matches_onnxruntime(cm, fixture_name, feeds, cm.run(feeds))
    assert cm.stats.peak_bytes <= cap


def test_normal_mode_reports_the_step_that_cannot_fit() -> None:
    path = fixture_path("mlp")
    uncapped = hyperion.compile(path, mode="normal")
    with pytest.raises(hyperion.MemoryLimitError) as info:
        hyperion.compile(path, mode="normal", memory_limit=uncapped.schedule.peak_bytes // 2)
    error = info.value
    assert error.node in uncapped.ir.nodes
    assert str(error.smallest_limit_bytes) in str(error) and error.node in str(error)
    # The smallest limit really is feasible, in normal mode.
    fits = hyperion.compile(path, mode="normal", memory_limit=error.smallest_limit_bytes)
    assert fits.schedule.mode == "normal" and fits.schedule.peak_bytes <= error.smallest_limit_bytes


def test_adaptive_records_its_choice() -> None:
    path = fixture_path("demo")
    uncapped = hyperion.compile(path, input_shapes={"image": [1, 3, 64, 64]})
    assert uncapped.schedule.mode == "normal" and "no memory limit" in uncapped.schedule.mode_reason
    # Half: the uncapped peak is one session's creation with every Conv weight reordered,
    # which a segmented normal plan at three quarters of it no longer pays at once.
    capped = hyperion.compile(path, memory_limit=uncapped.schedule.peak_bytes // 2,
                              input_shapes={"image": [1, 3, 64, 64]})
    assert capped.schedule.requested_mode == "adaptive"
    assert capped.schedule.mode == "memory_opt" and "normal mode needs" in capped.schedule.mode_reason


def test_symbolic_dims_are_bound_by_the_first_run_and_replanned_per_shape() -> None:
    path = fixture_path("dynamic_dims")
    cm = hyperion.compile(path)
    with pytest.raises(hyperion.ShapeError, match="input_ids"):
        _ = cm.schedule
    for batch, seq in ((2, 8), (3, 5)):
        rng = np.random.default_rng(batch)
        feeds = {"input_ids": rng.integers(0, 100, size=(batch, seq)).astype(np.int64)}
        assert_outputs_equal(cm.run(feeds), reference_outputs(path, feeds))
        assert cm.schedule.input_shapes == {"input_ids": (batch, seq)}
        assert cm.schedule.tensors["logits"].shape == (batch, 4)


def test_input_shapes_bind_at_compile_time() -> None:
    cm = hyperion.compile(fixture_path("dynamic_dims"), input_shapes={"input_ids": [4, 16]})
    assert cm.schedule.tensors["input_ids"].bytes == 4 * 16 * 8
    assert all(t.bytes is not None for t in cm.schedule.tensors.values())


def test_wrong_feeds_are_refused_by_name() -> None:
    cm = hyperion.compile(fixture_path("mlp"))
    with pytest.raises(hyperion.FeedError, match="'x'"):
        cm.run({})
    with pytest.raises(hyperion.FeedError, match="dtype"):
        cm.run({"x": np.zeros((1, 64), dtype=np.float64)})
    with pytest.raises(hyperion.FeedError, match="shape"):
        cm.run({"x": np.zeros((1, 65), dtype=np.float32)})
    with pytest.raises(hyperion.FeedError, match="'nope'"):
        cm.run({"x": np.zeros((1, 64), dtype=np.float32), "nope": np.zeros(1)})


def test_graph_edges_carry_kind_tensor_and_bytes() -> None:
    cm = hyperion.compile(fixture_path("resnet_block"))
    for _, _, data in cm.graph.edges(data=True):
        assert data["kind"] is not None and data["tensor"] and data["bytes"] > 0
    assert cm.graph.number_of_nodes() == len(cm.schedule.steps)
