"""Streaming and adaptive mode: the batch split into chunks whose size the plan picks,
outputs equal to the unsplit run, refusals that name the op, and the optimal batch size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import hyperion
from hyperion.frontend import import_model, load_source
from hyperion.ir import ExecutionMode
from hyperion.passes import classify_edges as classify_module
from hyperion.passes.batch.separable import analyze
from hyperion.passes.ordering import order as order_module
from hyperion.passes.pipeline import SegmentOptions
from hyperion.planner import optimal_batch_size, run_passes
from hyperion.planner.streaming import smallest_limit, stream_pinned_bytes
from tests.conftest import assert_outputs_equal, example_feeds, fixture_path, reference_outputs


def _shapes(feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: value.shape for name, value in feeds.items()}


def cap_for_chunk(name: str, batch: int, chunk: int) -> int:
    """The smallest cap at which streaming ``batch`` samples of ``name`` runs ``chunk`` at a time."""
    feeds = example_feeds(name, batch=batch)
    imported = import_model(load_source(fixture_path(name)), _shapes(feeds))
    options = SegmentOptions().for_mode(ExecutionMode.STREAMING)   # as compile plans streaming by default
    whole = run_passes(imported, ExecutionMode.MEMORY_OPT, None, options=options)
    analysis = analyze(whole.graph, whole.order)
    assert options.prefetch is not None and options.prepack_weights is not None
    return smallest_limit(whole, analysis, chunk, fixed_bytes=stream_pinned_bytes(imported.graph, analysis),
                          prefetch=options.prefetch, prepack_weights=options.prepack_weights)


@pytest.mark.parametrize("name", ["demo", "dynamic_dims"])
def test_streaming_splits_the_batch_and_matches_the_unsplit_run(name: str) -> None:
    feeds = example_feeds(name, batch=8)
    cap = cap_for_chunk(name, 8, 3)
    cm = hyperion.compile(fixture_path(name), memory_limit=cap, mode="streaming", input_shapes=_shapes(feeds))
    schedule = cm.schedule
    assert schedule.mode == "streaming" and schedule.batch_chunk == 3
    assert schedule.peak_bytes <= cap and all(step.live_bytes <= cap for step in schedule.steps)
    assert schedule.input_shapes[next(iter(feeds))][0] == 8          # the user feeds the whole batch
    outputs = cm.run(feeds)
    assert cm.stats.chunks == math.ceil(8 / 3)                       # 3 + 3 + 2
    assert_outputs_equal(outputs, reference_outputs(fixture_path(name), feeds))


def test_one_byte_less_picks_a_smaller_chunk() -> None:
    feeds = example_feeds("demo", batch=8)
    cap = cap_for_chunk("demo", 8, 3)
    cm = hyperion.compile(fixture_path("demo"), memory_limit=cap - 1, mode="streaming", input_shapes=_shapes(feeds))
    assert cm.schedule.batch_chunk == 2


def test_streaming_without_a_cap_runs_one_chunk() -> None:
    feeds = example_feeds("demo", batch=4)
    cm = hyperion.compile(fixture_path("demo"), mode="streaming", input_shapes=_shapes(feeds))
    assert cm.schedule.batch_chunk == 4
    assert_outputs_equal(cm.run(feeds), reference_outputs(fixture_path("demo"), feeds))
    assert cm.stats.chunks == 1


def test_streaming_refuses_a_graph_that_mixes_samples_naming_the_op() -> None:
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 8] y) { y = Softmax <axis = 0> (x) }""")
    with pytest.raises(hyperion.UnsupportedModelError, match=r"'Softmax_0' \(Softmax\) works along axis 0"):
        hyperion.compile(model, mode="streaming", memory_limit="1MB", input_shapes={"x": [4, 8]})


def _largest_cap_memory_opt_refuses(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Bisected between a cap memory_opt refuses and the smallest it names: the order it
    plans depends on the cap, so the cap just below the one it names may still fit."""
    def refuses(cap: int) -> bool:
        try:
            hyperion.compile(path, mode="memory_opt", memory_limit=cap, input_shapes=shapes)
        except hyperion.MemoryLimitError:
            return True
        return False

    with pytest.raises(hyperion.MemoryLimitError) as info:
        hyperion.compile(path, mode="memory_opt", memory_limit=1000, input_shapes=shapes)
    low, high = 1000, info.value.smallest_limit_bytes
    assert not refuses(high)
    while high - low > 1024:
        middle = (low + high) // 2
        low, high = (middle, high) if refuses(middle) else (low, middle)
    return low


def test_adaptive_picks_streaming_when_the_whole_batch_does_not_fit() -> None:
    feeds = example_feeds("demo", batch=8)
    path = fixture_path("demo")
    cap = _largest_cap_memory_opt_refuses(path, _shapes(feeds))
    cm = hyperion.compile(path, memory_limit=cap, input_shapes=_shapes(feeds))
    schedule = cm.schedule
    assert schedule.requested_mode == "adaptive" and schedule.mode == "streaming"
    assert "memory_opt needs at least" in schedule.mode_reason and "chunks of" in schedule.mode_reason
    assert 1 <= schedule.batch_chunk < 8 and schedule.peak_bytes <= cap
    assert_outputs_equal(cm.run(feeds), reference_outputs(path, feeds))


def test_adaptive_classifies_once_and_orders_once_per_planning_mode(monkeypatch) -> None:
    # Adaptive plans normal, memory_opt and streaming (with and without prefetch) on one
    # graph; edge kinds depend on none of them and the order only on normal vs memory_opt.
    feeds = example_feeds("demo", batch=8)
    path = fixture_path("demo")
    cap = _largest_cap_memory_opt_refuses(path, _shapes(feeds))
    classified, ordered = [], []
    classify, plan_order = classify_module.classify_edges, order_module.plan_order
    monkeypatch.setattr(classify_module, "classify_edges", lambda graph: classified.append(1) or classify(graph))
    monkeypatch.setattr(order_module, "plan_order",
                        lambda graph, mode, budget=None: ordered.append(mode) or plan_order(graph, mode, budget))
    cm = hyperion.compile(path, memory_limit=cap, input_shapes=_shapes(feeds))
    assert cm.schedule.mode == "streaming"
    assert len(classified) == 1
    assert ordered == [ExecutionMode.NORMAL, ExecutionMode.MEMORY_OPT]


def test_adaptive_prefers_normal_then_memory_opt() -> None:
    feeds = example_feeds("demo", batch=2)
    path = fixture_path("demo")
    uncapped = hyperion.compile(path, mode="normal", input_shapes=_shapes(feeds))
    fits = hyperion.compile(path, memory_limit=uncapped.schedule.peak_bytes, input_shapes=_shapes(feeds))
    assert fits.schedule.mode == "normal" and "normal mode fits" in fits.schedule.mode_reason
    with pytest.raises(hyperion.MemoryLimitError) as info:
        hyperion.compile(path, mode="normal", memory_limit=1000, input_shapes=_shapes(feeds))
    tighter = hyperion.compile(path, memory_limit=info.value.smallest_limit_bytes - 1, input_shapes=_shapes(feeds))
    assert tighter.schedule.mode == "memory_opt" and tighter.schedule.batch_chunk is None


def test_adaptive_explains_when_streaming_cannot_help() -> None:
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 64] x) => (float[N, 64] y) { y = Softmax <axis = 0> (x) }""")
    with pytest.raises(hyperion.MemoryLimitError, match="streaming cannot help.*Softmax"):
        hyperion.compile(model, memory_limit=1000, input_shapes={"x": [16, 64]})


def test_a_streaming_schedule_round_trips_and_runs(tmp_path) -> None:
    feeds = example_feeds("dynamic_dims", batch=8)
    path = fixture_path("dynamic_dims")
    cm = hyperion.compile(path, memory_limit=cap_for_chunk("dynamic_dims", 8, 4), mode="streaming",
                          input_shapes=_shapes(feeds))
    saved = cm.schedule.save(tmp_path / "s.json")
    loaded = hyperion.load(path, saved)
    assert loaded.schedule.batch_chunk == 4 and loaded.schedule.streaming.batch_size == 8
    assert_outputs_equal(loaded.run(feeds), reference_outputs(path, feeds))


@pytest.mark.parametrize("name", ["demo", "dynamic_dims"])
def test_the_optimal_batch_fits_and_one_more_sample_does_not(name: str) -> None:
    path = fixture_path(name)
    probe = hyperion.compile(path, mode="memory_opt", memory_limit=10**9, input_shapes=_shapes(example_feeds(name)))
    one = probe.schedule.peak_bytes
    cap = 3 * one
    cm = hyperion.compile(path, mode="memory_opt", memory_limit=cap, input_shapes=_shapes(example_feeds(name)))
    best = cm.calculate_optimal_batch_size(max_batch_size=4096)
    assert 1 <= best < 4096
    fits = hyperion.compile(path, mode="memory_opt", memory_limit=cap,
                            input_shapes=_shapes(example_feeds(name, batch=best)))
    assert fits.schedule.peak_bytes <= cap
    with pytest.raises(hyperion.MemoryLimitError):
        hyperion.compile(path, mode="memory_opt", memory_limit=cap,
                         input_shapes=_shapes(example_feeds(name, batch=best + 1)))


def test_the_optimal_batch_counts_the_callers_buffers_and_the_maximum() -> None:
    path = fixture_path("demo")
    imported = import_model(load_source(path), {"image": [1, 3, 64, 64]})
    cap = 8 * 2**20
    plain = optimal_batch_size(imported, cap, 4096)
    with_buffers = optimal_batch_size(imported, cap, 4096, input_bytes_per_sample=3 * 64 * 64 * 4,
                                      output_bytes_per_sample=40)
    assert 1 <= with_buffers < plain
    assert optimal_batch_size(imported, cap, 2) == 2
    assert optimal_batch_size(imported, 1000, 64) == 0
    with pytest.raises(hyperion.OptionError, match="max_batch_size"):
        optimal_batch_size(imported, cap, 0)
