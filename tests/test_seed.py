"""The seed API: layers by hand (abstract buffers) and layers from ONNX (real nodes)."""

from __future__ import annotations

import numpy as np
import pytest

import hyperion
from hyperion import (
    DependencyType,
    EdgeKind,
    ExecutionMode,
    FeedError,
    ForwardScheduler,
    HyperionError,
    ModelLoadError,
    SchedulerError,
    SchedulerMemoryError,
    open_mapped_model,
)
from tests.conftest import assert_outputs_equal, example_feeds, fixture_path, reference_outputs

KIB, MIB = 1024, 1024 * 1024
SEQ, NONE = DependencyType.SEQUENTIAL, DependencyType.NONE


def chain(sizes: list[int], max_memory: int | None = None) -> ForwardScheduler:
    scheduler = ForwardScheduler(None, ExecutionMode.NORMAL, max_memory)
    for i, size in enumerate(sizes):
        scheduler.add_layer(i, i - 1, SEQ, size) if i else scheduler.add_layer(0, -1, NONE, size)
    return scheduler


def run_all(scheduler: ForwardScheduler) -> list[int]:
    return list(iter(scheduler.execute_next_layer, None))


# -- types -------------------------------------------------------------------------------
def test_dependency_types_map_one_to_one_onto_edge_kinds() -> None:
    assert {DependencyType.from_edge_kind(k) for k in EdgeKind} == set(DependencyType)
    for dep in DependencyType:
        assert DependencyType.from_edge_kind(dep.to_edge_kind()) is dep
    assert hyperion.seed.ExecutionMode is hyperion.ir.ExecutionMode
    assert DependencyType.parse("HYPERION_DEP_RESIDUAL") is DependencyType.RESIDUAL
    assert DependencyType.parse(3) is DependencyType.ATTENTION  # the C enum's value
    assert DependencyType.parse(EdgeKind.SEQUENTIAL) is SEQ


# -- abstract layers ---------------------------------------------------------------------
def test_abstract_layer_outputs_are_buffers_of_their_size_until_released() -> None:
    scheduler = chain([3 * KIB, 5 * KIB, 7 * KIB])
    scheduler.prepare()
    assert scheduler.execute_next_layer() == 0
    out = scheduler.get_layer_output(0)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.nbytes == 3 * KIB
    assert scheduler.execute_next_layer() == 1
    assert scheduler.get_layer_output(0) is None  # liveness: its last reader has run
    assert not scheduler.layers[0].output_needed and scheduler.layers[0].memory_usage == 0
    assert scheduler.is_layer_executed(1) and not scheduler.is_layer_executed(2)
    assert scheduler.memory_usage == 5 * KIB
    assert scheduler.execute_next_layer() == 2
    assert scheduler.execute_next_layer() is None
    # the largest step holds 5 + 7 KiB; the last output is the pass's result and stays
    assert (scheduler.peak_memory_usage, scheduler.memory_usage) == (12 * KIB, 7 * KIB)


def test_exec_layer_records_the_seed_fields() -> None:
    scheduler = chain([KIB, KIB])
    scheduler.add_layer(2, 0, DependencyType.RESIDUAL, KIB)
    scheduler.add_layer(2, 1, SEQ, KIB)
    layer = scheduler.layers[2]
    assert (layer.layer_index, layer.depends_on_layer, layer.dep_type) == (2, 0, DependencyType.RESIDUAL)
    assert layer.dependencies == ((0, DependencyType.RESIDUAL), (1, SEQ))
    assert (layer.executed, layer.output_needed, layer.output, layer.output_size) == (False, True, None, KIB)
    assert scheduler.layers[0].depends_on_layer == -1 and scheduler.layers[0].dep_type is NONE


def test_marking_an_output_unneeded_releases_it_at_once() -> None:
    scheduler = ForwardScheduler(None, "normal", None)
    scheduler.add_layer(0, -1, NONE, 4 * KIB)
    scheduler.add_layer(1, 0, SEQ, KIB)
    scheduler.add_layer(2, 0, DependencyType.RESIDUAL, KIB)
    scheduler.prepare()
    scheduler.execute_next_layer()
    scheduler.execute_next_layer()
    assert scheduler.memory_usage == 5 * KIB
    scheduler.mark_output_unneeded(0)  # too early: layer 2 still reads it
    assert scheduler.memory_usage == KIB and scheduler.get_layer_output(0) is None
    with pytest.raises(SchedulerError, match="layer 2 reads the output of layer 0"):
        scheduler.execute_next_layer()


def test_reset_starts_a_new_pass() -> None:
    scheduler = chain([KIB, 2 * KIB])
    scheduler.prepare()
    run_all(scheduler)
    scheduler.reset()
    assert scheduler.memory_usage == 0 and scheduler.peak_memory_usage == 0
    assert not any(layer.executed for layer in scheduler.layers)
    assert run_all(scheduler) == [0, 1] and scheduler.peak_memory_usage == 3 * KIB


# -- errors ------------------------------------------------------------------------------
def test_prepare_rejects_a_cycle() -> None:
    scheduler = chain([KIB, KIB, KIB])
    scheduler.add_layer(0, 2, SEQ, KIB)
    with pytest.raises(SchedulerError, match="dependency cycle: 0 -> 1 -> 2 -> 0"):
        scheduler.prepare()


def test_prepare_rejects_a_dependency_on_a_layer_never_added() -> None:
    scheduler = chain([KIB, KIB])
    scheduler.add_layer(2, 7, SEQ, KIB)
    with pytest.raises(SchedulerError, match="layer 2 depends on layer 7, which was never added"):
        scheduler.prepare()


def test_a_layer_added_twice_with_conflicting_sizes_is_refused() -> None:
    scheduler = chain([KIB, KIB, KIB])
    with pytest.raises(SchedulerError, match="layer 2 was added with output_size 1024 bytes and now 2048"):
        scheduler.add_layer(2, 0, DependencyType.RESIDUAL, 2 * KIB)


@pytest.mark.parametrize("dep_type", ["skip", 7, None, EdgeKind])
def test_an_unknown_dependency_type_is_refused(dep_type: object) -> None:
    scheduler = chain([KIB])
    with pytest.raises(SchedulerError, match="layer 1: unknown dependency type"):
        scheduler.add_layer(1, 0, dep_type, KIB)


def test_none_goes_with_no_dependency() -> None:
    scheduler = chain([KIB])
    with pytest.raises(SchedulerError, match="DependencyType.NONE goes with depends_on=-1"):
        scheduler.add_layer(1, 0, NONE, KIB)


def test_prepare_rejects_a_plan_over_max_memory_naming_the_layer() -> None:
    # layer 2 runs holding its input (layer 1, 2 MiB) and its output (4 MiB): 6 MiB > 5 MiB
    scheduler = chain([MIB, 2 * MIB, 4 * MIB], max_memory=5 * MIB)
    with pytest.raises(SchedulerMemoryError, match=r"layer 2 needs 6291456 bytes .* layers \[1\]") as info:
        scheduler.prepare()
    assert isinstance(info.value, hyperion.MemoryLimitError) and info.value.needed_bytes == 6 * MIB
    chain([MIB, 2 * MIB, 4 * MIB], max_memory=6 * MIB).prepare()  # the bytes named are enough


def test_calls_out_of_order_are_refused() -> None:
    scheduler = chain([KIB, KIB])
    with pytest.raises(SchedulerError, match="prepare"):
        scheduler.execute_next_layer()
    with pytest.raises(SchedulerError, match="no layer 5"):
        scheduler.get_layer_output(5)
    with pytest.raises(SchedulerError, match="no layers to schedule"):
        ForwardScheduler(None).prepare()
    scheduler.prepare()
    with pytest.raises(FeedError, match="read no graph inputs"):
        scheduler.execute_next_layer({"x": np.zeros(1)})
    with pytest.raises(SchedulerError, match="has not run yet"):
        scheduler.mark_output_unneeded(1)


# -- batch size --------------------------------------------------------------------------
def test_optimal_batch_size_is_the_largest_that_fits_the_plan() -> None:
    # per sample the plan peaks at 1 + 2 MiB (step 1); with 1 MiB in and 1 MiB out a
    # sample costs 5 MiB, so 64 MiB holds floor(64 / 5) = 12 samples (60 MiB), not 13 (65).
    scheduler = chain([MIB, 2 * MIB, MIB], max_memory=64 * MIB)
    batch = scheduler.calculate_optimal_batch_size(MIB, MIB, 100)
    assert batch == 12
    assert scheduler.plan.batch_peak_bytes(12, MIB, MIB) == 60 * MIB <= 64 * MIB
    assert scheduler.plan.batch_peak_bytes(13, MIB, MIB) == 65 * MIB > 64 * MIB
    assert scheduler.calculate_optimal_batch_size(MIB, MIB, 8) == 8
    assert chain([MIB], max_memory=None).calculate_optimal_batch_size(MIB, MIB, 8) == 8
    with pytest.raises(SchedulerMemoryError, match="not even a batch of 1"):
        scheduler.calculate_optimal_batch_size(64 * MIB, 0, 4)


# -- from ONNX ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["seed_residual", "seed_attention", "transformer_block", "resnet_block"])
@pytest.mark.parametrize("mode", ["normal", "memory_opt"])
def test_from_onnx_runs_every_layer_and_matches_onnxruntime(name: str, mode: str) -> None:
    feeds = example_feeds(name)
    scheduler = ForwardScheduler.from_onnx(fixture_path(name), mode=mode)
    assert len(scheduler.layers) == open_mapped_model(fixture_path(name)).layer_count
    scheduler.prepare(feeds)
    assert run_all(scheduler) == list(range(len(scheduler.layers)))
    expected = reference_outputs(fixture_path(name), feeds, prepack_weights=scheduler.schedule.packed_kernels)
    assert_outputs_equal(scheduler.outputs(), expected)


def test_onnx_outputs_are_released_by_liveness_alone() -> None:
    scheduler = ForwardScheduler.from_onnx(fixture_path("seed_attention"), mode="memory_opt")
    schedule = scheduler.schedule
    assert schedule is not None and all(s.first_step == s.last_step for s in schedule.segments)
    freed_after = {t: s.index for s in schedule.steps for t in s.frees}
    planned = scheduler.plan.by_index()
    scheduler.prepare(example_feeds("seed_attention"))
    usage = []
    while (index := scheduler.execute_next_layer()) is not None:
        usage.append(scheduler.memory_usage)
        for i in range(index + 1):
            (tensor,) = planned[i].outputs
            out = scheduler.get_layer_output(i)
            assert (out is None) == (freed_after.get(tensor, len(schedule.steps)) <= index)
            assert out is None or (isinstance(out, np.ndarray) and out.shape == (1, 8, 32))
    # every activation is [1, 8, 32] float32 = 1 KiB. Held after each layer: 0:E, 1:E+Q,
    # 2:E+Q+K, 3:E+Q+K+V, 4: A+E (Q, K, V freed), 5: N (E, A freed), 6: N+F, 7: O.
    assert usage == [k * KIB for k in (1, 2, 3, 4, 2, 1, 2, 1)]
    assert scheduler.peak_memory_usage == 5 * KIB  # layer 4 runs with E, Q, K, V held
    assert scheduler.layers[0].released_after == 5 and scheduler.layers[7].released_after is None


def test_onnx_feeds_are_required_and_checked() -> None:
    scheduler = ForwardScheduler.from_onnx(fixture_path("seed_residual"))
    with pytest.raises(FeedError, match="reads graph input 'x'"):
        scheduler.execute_next_layer()
    with pytest.raises(FeedError, match="shape"):
        scheduler.execute_next_layer({"x": np.zeros((2, 256), np.float32)})
    assert scheduler.execute_next_layer(example_feeds("seed_residual")) == 0
    with pytest.raises(FeedError, match="first layer of a pass"):
        scheduler.execute_next_layer(example_feeds("seed_residual"))
    with pytest.raises(SchedulerError, match="come from its model"):
        scheduler.add_layer(9, -1, NONE, 1)


def test_from_compiled_steps_through_a_segmented_plan() -> None:
    compiled = hyperion.compile(fixture_path("mlp"), mode="normal")
    assert len(compiled.schedule.segments) == 1  # the whole model in one session
    scheduler = ForwardScheduler.from_compiled(compiled)
    feeds = example_feeds("mlp")
    scheduler.prepare(feeds)
    assert run_all(scheduler) == [0, 1, 2, 3, 4]
    assert_outputs_equal(scheduler.outputs(), compiled.run(feeds))


def test_onnx_plan_over_max_memory_is_refused() -> None:
    with pytest.raises(SchedulerMemoryError, match="does not fit max_memory") as info:
        ForwardScheduler.from_onnx(fixture_path("seed_residual"), mode="memory_opt", max_memory=4 * KIB)
    # a step needs at least its live tensors and one tile of its 256 KiB weight (the tile
    # pass splits it): more than the cap, less than the weight, and enough as a cap
    needed = info.value.needed_bytes
    assert 256 * KIB > needed > 4 * KIB and isinstance(info.value, hyperion.MemoryLimitError)
    ForwardScheduler.from_onnx(fixture_path("seed_residual"), mode="memory_opt", max_memory=needed)


def test_onnx_batch_size_scales_activations_not_weights() -> None:
    limit = 2 * MIB
    scheduler = ForwardScheduler.from_onnx(fixture_path("seed_residual"), mode="memory_opt", max_memory=limit)
    plan, schedule = scheduler.plan, scheduler.schedule
    assert plan.step_bytes == tuple(s.live_bytes for s in schedule.steps)  # the compiled plan's bytes
    # Per sample every activation is [1, 256] float32 = 1 KiB; live at each step:
    # 0: x + input_layer, 1: input_layer + conv1, 2: input_layer + conv1 + conv2,
    # 3: input_layer + conv2 + residual, 4: conv2 + residual + output.
    activation_bytes = [2 * KIB, 2 * KIB, 3 * KIB, 3 * KIB, 3 * KIB]
    assert plan.activation_bytes == tuple(activation_bytes)
    # The rest of each step's bytes is weights, which do not grow with the batch; with 1 KiB
    # in and 1 KiB out per sample, step i allows (limit - weights_i) // (activations_i + 2 KiB).
    weight_bytes = [s.live_bytes - a for s, a in zip(schedule.steps, activation_bytes, strict=True)]
    assert max(weight_bytes) >= 256 * KIB  # a 256x256 float32 weight is resident at steps 0-2
    expected = min((limit - w) // (a + 2 * KIB) for a, w in zip(activation_bytes, weight_bytes, strict=True))
    batch = scheduler.calculate_optimal_batch_size(1 * KIB, 1 * KIB, 10_000)
    assert batch == expected
    assert plan.batch_peak_bytes(batch, KIB, KIB) <= limit < plan.batch_peak_bytes(batch + 1, KIB, KIB)


def test_mapped_model() -> None:
    config = hyperion.default_mmap_config()
    config.max_cache_size = 50 * MIB
    with open_mapped_model(fixture_path("external_data"), config) as model:
        assert model.layer_count == 8 and model.config.max_cache_size == 50 * MIB
    assert model.closed
    with pytest.raises(SchedulerError, match="closed"):
        _ = model.layer_count
    with pytest.raises(ModelLoadError):
        open_mapped_model(fixture_path("mlp").with_name("missing.onnx"))
    with pytest.raises(HyperionError, match="max_cache_size"):
        open_mapped_model(fixture_path("mlp"), hyperion.MmapConfig(max_cache_size=-1))
