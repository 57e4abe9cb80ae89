"""memory_opt: weights streamed from external data segment by segment, the next segment
prefetched on a background thread, a bounded cache of sessions kept across runs, and
models whose weights are embedded in the .onnx file."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

import hyperion
from fixtures.streaming_mlp import build_streaming_mlp
from hyperion.frontend import load_source
from hyperion.passes.memory.costs import session_bookkeeping_bytes
from hyperion.passes.tile_ops import TILE_UNIT
from tests.conftest import reference_outputs
from tests.test_rss import _float64_reference

HIDDEN, LAYERS = 256, 6
WEIGHT_BYTES = HIDDEN * HIDDEN * 4
CAP = 3 * WEIGHT_BYTES + 65536   # one layer's session, the next one's creation, activations


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_streaming_mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx", layers=LAYERS, hidden=HIDDEN)


def feeds(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch).standard_normal((batch, HIDDEN)).astype(np.float32)}


def compiled(model: Path | onnx.ModelProto, cap: int | None = CAP, **options: object) -> hyperion.CompiledModel:
    """memory_opt, by default one layer (MatMul, Relu) per segment, weights pre-packed (the
    fed path, memory_opt's default, is tested below with ``prepack_weights=False``)."""
    options.setdefault("max_segment_steps", 2)
    options.setdefault("prepack_weights", True)
    return hyperion.compile(model, memory_limit=cap, mode="memory_opt", input_shapes={"x": [2, HIDDEN]},
                            **options)  # type: ignore[arg-type]


def test_outputs_are_bit_identical_to_onnxruntime_run_after_run(mlp: Path) -> None:
    cm = compiled(mlp, weight_cache=0)
    assert len(cm.schedule.segments) == LAYERS
    expected = reference_outputs(mlp, feeds())
    for _ in range(2):
        np.testing.assert_array_equal(cm.run(feeds())["y"], expected["y"])  # same pre-packed kernels
    assert cm.stats.peak_bytes <= CAP


def test_the_next_session_is_built_on_a_background_thread(mlp: Path) -> None:
    cm = compiled(mlp, weight_cache=0)
    runtime = cm._active().runtime
    threads: list[str] = []
    build = runtime.pool._build_fn

    def recording(index: int):
        threads.append(threading.current_thread().name)
        return build(index)

    runtime.pool._build_fn = recording
    segments = len(cm.schedule.segments)
    cm.run(feeds())
    assert cm.schedule.prefetch and cm.schedule.cyclic_prefetch
    assert cm.stats.sessions.prefetched == segments - 1    # all but the first, built while another ran
    assert threads[0] == threading.current_thread().name
    assert all(name.startswith("hyperion-prefetch") for name in threads[1:])
    cm.run(feeds())
    assert cm.stats.sessions.prefetched == segments        # the last segment prefetched the first


def test_without_prefetch_sessions_are_built_when_needed(mlp: Path) -> None:
    cm = compiled(mlp, prefetch=False, weight_cache=0)
    assert not cm.schedule.prefetch
    cm.run(feeds())
    assert cm.stats.sessions.prefetched == 0 and cm.stats.sessions.built == len(cm.schedule.segments)


def test_the_plan_accounts_the_next_segments_creation_while_one_runs(mlp: Path) -> None:
    schedule = compiled(mlp, weight_cache=0).schedule
    held, loading = [s.held_bytes for s in schedule.segments], [s.loading_bytes for s in schedule.segments]
    assert max(loading) == 2 * WEIGHT_BYTES                # the packed copy and the original, while packing
    for segment in schedule.segments[:-1]:
        ahead = loading[segment.index + 1]
        assert all(schedule.steps[i].live_bytes >= held[segment.index] + ahead for i in segment.steps)
    assert schedule.peak_bytes <= CAP


def test_the_weight_cache_keeps_sessions_alive_across_runs(mlp: Path) -> None:
    budget = 2 * (WEIGHT_BYTES + session_bookkeeping_bytes(4))
    cm = compiled(mlp, cap=8 * WEIGHT_BYTES, weight_cache=budget)
    schedule = cm.schedule
    cached = [s.index for s in schedule.segments if s.cached]
    assert 1 <= len(cached) <= 2
    segments = schedule.segments
    assert sum(segments[i].held_bytes + session_bookkeeping_bytes(len(segments[i].steps)) for i in cached) <= budget
    for index in cached:   # cached weights are loaded once and never evicted
        assert schedule.steps[schedule.segments[index].last_step].evicts == ()
    expected = reference_outputs(mlp, feeds())
    cm.run(feeds())
    np.testing.assert_array_equal(cm.run(feeds())["y"], expected["y"])
    assert cm.stats.sessions.reused == len(cached)
    assert cm.stats.sessions.built <= len(schedule.segments) - len(cached)
    cm.close()
    assert not any(cm._active().runtime.pool.is_kept(i) for i in cached)


def test_a_zero_cache_keeps_nothing_and_a_bad_size_is_refused(mlp: Path) -> None:
    assert not any(s.cached for s in compiled(mlp, cap=None, weight_cache=0).schedule.segments)
    assert [s.cached for s in compiled(mlp, cap=None).schedule.segments] == [True] * LAYERS  # no cap, no bound
    with pytest.raises(hyperion.OptionError, match="weight_cache"):
        compiled(mlp, weight_cache="lots")


def matmul_chain(folder: Path, *, shared_weight: bool = False) -> Path:
    """MatMuls back to back: every step has a weight, so the double buffer costs a weight more.
    With ``shared_weight`` every step reads one weight, so no step can be split into tiles
    (the tile pass splits only a weight that its step alone reads)."""
    rng = np.random.default_rng(1)
    count = 1 if shared_weight else 4
    weights = [onnx.numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 16, f"w{i}")
               for i in range(count)]
    names = ["x", "h0", "h1", "h2", "y"]
    nodes = [onnx.helper.make_node("MatMul", [names[i], f"w{i % count}"], [names[i + 1]]) for i in range(4)]
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(nodes, "chain", [value("x", onnx.TensorProto.FLOAT, ["n", HIDDEN])],
                                   [value("y", onnx.TensorProto.FLOAT, ["n", HIDDEN])], weights)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "chain.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="chain.data", size_threshold=0)
    return path


def test_prefetch_is_dropped_when_the_double_buffer_does_not_fit(tmp_path: Path) -> None:
    path = matmul_chain(tmp_path, shared_weight=True)   # steps that tiles cannot shrink
    with pytest.raises(hyperion.MemoryLimitError) as info:
        compiled(path, cap=1000, max_segment_steps=None)
    smallest = info.value.smallest_limit_bytes                 # the smallest that works, without prefetch
    with_prefetch = compiled(path, cap=4 * WEIGHT_BYTES, max_segment_steps=None)
    assert with_prefetch.schedule.prefetch and smallest < 3 * WEIGHT_BYTES
    cm = compiled(path, cap=smallest, max_segment_steps=None)
    assert not cm.schedule.prefetch and "prefetch off" in cm.schedule.mode_reason
    np.testing.assert_array_equal(cm.run(feeds())["y"], reference_outputs(path, feeds())["y"])


def _embedded_copy(mlp: Path, folder: Path) -> Path:
    model = onnx.load(str(mlp))                                # external data loaded into the proto
    path = folder / "embedded.onnx"
    onnx.save(model, str(path))
    return path


def test_a_model_file_with_embedded_weights_is_read_in_place(mlp: Path, tmp_path: Path) -> None:
    path = _embedded_copy(mlp, tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    source = load_source(path)
    weights = [t for t in source.proto.graph.initializer if t.name.startswith("w")]
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert {e.value for t in weights for e in t.external_data if e.key == "location"} == {"embedded.onnx"}
    assert source.proto.ByteSize() < 10_000 and source.sha256 == before
    cm = compiled(path, weight_cache=0)
    np.testing.assert_array_equal(cm.run(feeds())["y"], reference_outputs(path, feeds())["y"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before and list(tmp_path.iterdir()) == [path]


def test_an_in_memory_model_spills_its_weights_once_to_the_cache(mlp: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERION_CACHE_DIR", str(tmp_path / "cache"))
    model = onnx.load(str(mlp))
    untouched = model.SerializeToString()
    cm = compiled(model, weight_cache=0)
    expected = reference_outputs(untouched, feeds())
    np.testing.assert_array_equal(cm.run(feeds())["y"], expected["y"])
    spilled = list((tmp_path / "cache" / "weights").glob("*/weights.bin"))
    assert len(spilled) == 1 and spilled[0].stat().st_size == LAYERS * WEIGHT_BYTES
    assert model.SerializeToString() == untouched
    again = compiled(model, weight_cache=0)                    # the spilled file is reused
    np.testing.assert_array_equal(again.run(feeds())["y"], expected["y"])
    assert len(list((tmp_path / "cache" / "weights").glob("*/*"))) == 1


def _smallest_cap(mlp: Path, **options: object) -> int:
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(mlp, memory_limit=1, mode="memory_opt", input_shapes={"x": [2, HIDDEN]},
                         **options)  # type: ignore[arg-type]
    return refused.value.smallest_limit_bytes


def test_unpacked_weights_are_planned_at_their_size_and_run_unpacked(mlp: Path, tmp_path: Path) -> None:
    packed_smallest = _smallest_cap(mlp, prefetch=False, prepack_weights=True)
    unpacked_smallest = _smallest_cap(mlp, prepack_weights=False)
    # Packed: a session holds the packed copy and, while created, the original too. At the
    # smallest cap every MatMul runs in tiles (the tile pass), so that is one tile's original.
    assert packed_smallest - unpacked_smallest == HIDDEN * TILE_UNIT * 4 < WEIGHT_BYTES
    cm = compiled(mlp, unpacked_smallest, prepack_weights=False, max_segment_steps=None)
    assert cm.schedule.prepack_weights is False and cm.schedule.prefetch is False
    assert cm.schedule.peak_bytes <= unpacked_smallest
    x = feeds()
    # At the smallest cap every MatMul runs in tiles, and unpacked, onnxruntime's GEMM blocks
    # a tile's columns otherwise than the whole weight's (M > 1): within twice onnxruntime's
    # own error against float64 (docs/memory.md, "Steps bigger than the cap").
    assert any(step.tiles is not None for step in cm.schedule.steps)
    exact = _float64_reference(mlp, x["x"])
    error = np.abs(cm.run(x)["y"] - exact).max()
    assert error <= 2 * np.abs(reference_outputs(mlp, x, prepack_weights=False)["y"] - exact).max()
    # A saved schedule planned unpacked runs unpacked, whatever load is asked.
    path = cm.schedule.save(tmp_path / "unpacked.json")
    again = hyperion.load(mlp, path)
    assert not again._active().runtime.prepack_weights
    np.testing.assert_array_equal(again.run(x)["y"], cm.run(x)["y"])


def _same_kernels_reference(cm: hyperion.CompiledModel, model: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    """What plain onnxruntime gives with the kernels the plan's fed segments run: packed
    when every one is relaid (its weights packed once into the file its session maps),
    unpacked when none is."""
    relaid = {s.relaid for s in cm.schedule.segments if s.fed_weights}
    assert len(relaid) == 1, "a plan mixing relaid and plainly fed segments matches neither reference"
    return reference_outputs(model, x, prepack_weights=cm.schedule.packed_kernels)["y"]


@pytest.mark.parametrize("plainly", [False, True], ids=["relaid", "fed plainly"])
def test_unpacked_sessions_are_built_once_and_fed_mapped_weights_on_every_run(mlp: Path, plainly: bool) -> None:
    # Relaid, a segment's creation holds its weights packed and the largest twice more:
    # under 3 weights' worth, every segment is fed its weights plainly.
    cap = 2 * WEIGHT_BYTES + (128 << 10 if plainly else 1 << 20)
    cm = compiled(mlp, cap, prepack_weights=False, max_segment_steps=None)
    segments = cm.schedule.segments
    assert len(segments) > 1 and all(s.persistent for s in segments)
    fed = [w for s in segments for w in s.fed_weights]
    assert fed and sorted(fed) == sorted(w for s in segments for w in s.weights if not s.cached)
    assert all(s.relaid != plainly for s in segments if s.fed_weights)
    x = feeds()
    expected = _same_kernels_reference(cm, mlp, x)
    first = cm.run(x)["y"]
    assert cm.stats.sessions.built == len(segments)
    second = cm.run(x)["y"]
    # Steady state: no session built; every plainly fed weight handed over from its mapping
    # (a relaid segment's session maps its own file).
    assert cm.stats.sessions.built == 0 and cm.stats.sessions.reused == len(segments)
    plainly_fed = [w for s in segments if not s.relaid for w in s.fed_weights]
    assert cm.stats.fed_bytes == len(plainly_fed) * WEIGHT_BYTES
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    # What a session is fed is a view of the mapped file, not a copy of it.
    view = cm._active().runtime.weights.view(fed[0])
    assert not view.flags.owndata and not view.flags.writeable
    cm.close()


def test_by_default_streamed_weights_are_fed_and_resident_ones_packed(mlp: Path) -> None:
    x = feeds()
    capped = hyperion.compile(mlp, memory_limit=2 * WEIGHT_BYTES + (1 << 20), input_shapes={"x": [2, HIDDEN]})
    schedule = capped.schedule
    assert schedule.mode == "memory_opt" and not schedule.prepack_weights and not schedule.prefetch
    assert all(s.persistent for s in schedule.segments) and any(s.fed_weights for s in schedule.segments)
    capped.run(x)
    np.testing.assert_array_equal(capped.run(x)["y"], _same_kernels_reference(capped, mlp, x))
    assert capped.stats.sessions.built == 0          # a capped run in steady state builds nothing
    uncapped = hyperion.compile(mlp, input_shapes={"x": [2, HIDDEN]})
    assert uncapped.schedule.mode == "normal" and uncapped.schedule.prepack_weights
    np.testing.assert_array_equal(uncapped.run(x)["y"], reference_outputs(mlp, x)["y"])


def test_the_optimal_batch_of_an_unpacked_plan_is_read_off_that_plan(mlp: Path) -> None:
    cap = 3 * WEIGHT_BYTES
    sizes = {}
    for prepack in (True, False):
        cm = hyperion.compile(mlp, memory_limit=cap, mode="memory_opt", input_shapes={"x": [1, HIDDEN]},
                              prepack_weights=prepack)
        sizes[prepack] = best = cm.calculate_optimal_batch_size(max_batch_size=1 << 16)
        fits = hyperion.compile(mlp, memory_limit=cap, mode="memory_opt", input_shapes={"x": [best, HIDDEN]},
                                prepack_weights=prepack)
        assert fits.schedule.peak_bytes <= cap
        # The batch is read off the plan of whole steps: one sample more does not fit
        # without splitting a step into tiles (the tile pass), if at all.
        try:
            more = hyperion.compile(mlp, memory_limit=cap, mode="memory_opt", input_shapes={"x": [best + 1, HIDDEN]},
                                    prepack_weights=prepack)
        except hyperion.MemoryLimitError:
            continue
        assert any(step.tiles is not None for step in more.schedule.steps)
    assert sizes[False] > sizes[True] > 0   # unpacked sessions hold less: room for more samples
