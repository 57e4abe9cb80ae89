"""hyperion.partition: contiguous pipeline stages of the compiled order, balanced, each a model of
its own compiled under the per-stage cap; refusals name the fewest stages and the smallest cap.
No Ray here: stages run one after another in this process."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest

import hyperion
from fixtures.streaming_mlp import build_streaming_mlp
from hyperion.planner.partition import Partition
from tests.conftest import assert_outputs_equal, example_feeds, fixture_path, reference_outputs

# Cuts through a fusion onnxruntime applies to the whole model (Conv + Add/Relu, fused
# attention) run it unfused: equal to the tolerance, not bit for bit.
FUSED_ACROSS_CUTS = {"resnet_block", "transformer_block_fused", "old_opset", "demo"}
MLP_LAYERS, MLP_HIDDEN = 6, 64


def run_stages(plan: Partition, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each stage's model run from its schedule, in order, on what earlier stages produced."""
    produced = dict(feeds)
    for stage in plan.stages:
        model = hyperion.load(stage.model, stage.schedule, base_dir=plan.base_dir)
        produced.update(model.run({name: produced[name] for name in stage.inputs}))
    return {name: produced[name] for name in plan.graph_outputs}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six equal MatMul+Relu layers (64 x 64 weights, 16 KiB each), batch symbolic."""
    return build_streaming_mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx", layers=MLP_LAYERS, hidden=MLP_HIDDEN)


def mlp_feeds(batch: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((batch, MLP_HIDDEN)).astype(np.float32)}


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("name", ["mlp", "resnet_block", "unet", "transformer_block", "transformer_block_fused",
                                  "seed_attention", "external_data", "old_opset", "demo", "encoder_outputs"])
def test_stages_run_one_after_another_give_onnxruntimes_outputs(name: str, stages: int) -> None:
    feeds = example_feeds(name)
    plan = hyperion.partition(fixture_path(name), stages, input_shapes={k: list(v.shape) for k, v in feeds.items()})
    assert len(plan.stages) == stages
    assert [s.first_step for s in plan.stages] == [0, *(s.last_step + 1 for s in plan.stages[:-1])]
    assert all(s.resident for s in plan.stages)   # no cap: every stage normal mode
    ours, expected = run_stages(plan, feeds), reference_outputs(fixture_path(name), feeds)
    if name in FUSED_ACROSS_CUTS:
        assert_outputs_equal(ours, expected)
    else:
        for output, want in expected.items():
            np.testing.assert_array_equal(ours[output], want, err_msg=output)


def test_the_stage_graph_names_every_tensor_crossing_a_cut(mlp: Path) -> None:
    plan = hyperion.partition(mlp, 3, input_shapes={"x": [4, MLP_HIDDEN]})
    crossing = [(e.src, e.dst, e.tensor) for e in plan.edges]
    last_of = [plan.stages[k].nodes[-1] for k in range(2)]
    assert (None, 0, "x") in crossing and (2, None, "y") in crossing
    # Each cut carries one activation (4 x 64 float32), from the stage before to the stage after.
    between = [e for e in plan.edges if e.src is not None and e.dst is not None]
    assert [(e.src, e.dst) for e in between] == [(0, 1), (1, 2)]
    assert all(e.bytes == 4 * MLP_HIDDEN * 4 for e in between) and plan.boundary_bytes == 2 * 4 * MLP_HIDDEN * 4
    assert all(last.startswith("relu") for last in last_of)   # cut after a layer's Relu, not inside it


@pytest.mark.parametrize("balance", ["time", "bytes"])
def test_equal_layers_are_shared_equally(mlp: Path, balance: str) -> None:
    plan = hyperion.partition(mlp, 3, balance=balance, input_shapes={"x": [4, MLP_HIDDEN]})
    assert [len(s.weights) for s in plan.stages] == [2, 2, 2]
    assert len({s.weight_bytes for s in plan.stages}) == 1


SHRINK = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4096] x) => (float[1,16] y) {
    a = Relu (x)
    axes = Constant <value = int64[1] {1}> ()
    starts = Constant <value = int64[1] {0}> ()
    ends = Constant <value = int64[1] {16}> ()
    small = Slice (a, starts, ends, axes)
    b = Relu (small)
    y = Sigmoid (b)
}"""


def test_among_balanced_cuts_the_one_carrying_fewest_bytes_wins(tmp_path: Path) -> None:
    """Two stages by weight bytes (none here: every cut is as balanced) -- the cut sends the
    16-float slice, not the 4096-float activation before it."""
    path = tmp_path / "shrink.onnx"
    onnx.save(onnx.parser.parse_model(SHRINK), path)
    plan = hyperion.partition(path, 2, balance="bytes")
    assert plan.boundary_bytes == 16 * 4
    x = np.random.default_rng(1).standard_normal((1, 4096)).astype(np.float32)
    np.testing.assert_array_equal(run_stages(plan, {"x": x})["y"], reference_outputs(path, {"x": x})["y"])


def test_a_cap_too_small_for_resident_stages_names_the_fewest_stages_and_the_smallest_cap(mlp: Path) -> None:
    shapes = {"x": [4, MLP_HIDDEN]}
    # Two 16 KiB layers fit, with their activations and the original of the weight being
    # packed while a session is created; three do not.
    cap = 56 * 1024
    with pytest.raises(hyperion.PartitionError) as refused:
        hyperion.partition(mlp, 2, cap, input_shapes=shapes, require_resident=True)
    error = refused.value
    assert error.smallest_stages == 3 and "3 stages fit it" in str(error)
    assert error.smallest_limit_bytes > cap and isinstance(error, hyperion.MemoryLimitError)
    # Both ways out the message names work.
    fewer = hyperion.partition(mlp, error.smallest_stages, cap, input_shapes=shapes, require_resident=True)
    assert all(s.resident and s.schedule.peak_bytes <= cap for s in fewer.stages)
    larger = hyperion.partition(mlp, 2, error.smallest_limit_bytes, input_shapes=shapes, require_resident=True)
    assert all(s.resident for s in larger.stages)
    with pytest.raises(hyperion.PartitionError):
        hyperion.partition(mlp, 2, error.smallest_limit_bytes - 1, input_shapes=shapes, require_resident=True)


def test_a_stage_whose_share_cannot_fit_streams_its_weights_under_the_cap(mlp: Path) -> None:
    cap = 40 * 1024
    plan = hyperion.partition(mlp, 2, cap, input_shapes={"x": [4, MLP_HIDDEN]})
    assert [s.schedule.mode.value for s in plan.stages] == ["memory_opt", "memory_opt"]
    assert all(s.schedule.peak_bytes <= cap for s in plan.stages)
    feeds = mlp_feeds()
    # Streamed weights are fed unpacked: onnxruntime's kernels with pre-packing off, bit for bit.
    expected = reference_outputs(mlp, feeds, prepack_weights=all(s.schedule.packed_kernels for s in plan.stages))
    np.testing.assert_array_equal(run_stages(plan, feeds)["y"], expected["y"])


def test_one_step_larger_than_the_cap_is_refused_with_the_cap_that_works(mlp: Path) -> None:
    with pytest.raises(hyperion.PartitionError, match="no number of stages fits it") as refused:
        hyperion.partition(mlp, 2, "8KB", input_shapes={"x": [4, MLP_HIDDEN]}, require_resident=True)
    assert refused.value.smallest_stages == 0 and refused.value.smallest_limit_bytes > 16 * 1024


def test_a_stage_that_cannot_fit_even_streaming_is_refused_naming_it(mlp: Path) -> None:
    with pytest.raises(hyperion.PartitionError, match=r"stage 0 \(steps 0-") as refused:
        hyperion.partition(mlp, 2, "2KB", input_shapes={"x": [4, MLP_HIDDEN]})
    # A step needs its activations and one tile of its 16 KiB weight (the tile pass splits it):
    # more than the cap, less than the weight.
    assert 2000 < refused.value.smallest_limit_bytes < 16 * 1024


def test_a_free_batch_dim_lets_stages_run_other_batches(mlp: Path) -> None:
    plan = hyperion.partition(mlp, 2, input_shapes={"x": [4, MLP_HIDDEN]})
    assert plan.free_batch
    feeds = mlp_feeds(batch=3)   # planned for 4: the stages plan 3 on first use
    np.testing.assert_array_equal(run_stages(plan, feeds)["y"], reference_outputs(mlp, feeds)["y"])


def test_a_partition_is_saved_and_loaded_with_its_stage_schedules(mlp: Path, tmp_path: Path) -> None:
    plan = hyperion.partition(mlp, 3, "1MB", input_shapes={"x": [4, MLP_HIDDEN]})
    path = plan.save(tmp_path / "mlp.partition.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mlp.partition.json", *(f"mlp.partition.stage{k}.{ext}" for k in range(3) for ext in ("onnx", "schedule.json"))]
    loaded = Partition.load(path)
    assert loaded == plan
    feeds = mlp_feeds()
    np.testing.assert_array_equal(run_stages(loaded, feeds)["y"], reference_outputs(mlp, feeds)["y"])
    data = json.loads(path.read_text())
    assert data["format"] == "hyperion.partition" and data["version"] == 1
    # A stage schedule that is not its stage model's is refused.
    other = tmp_path / "mlp.partition.stage1.schedule.json"
    other.write_text((tmp_path / "mlp.partition.stage0.schedule.json").read_text())
    with pytest.raises(hyperion.ScheduleError, match="stage1"):
        Partition.load(path)


def test_a_compiled_model_or_its_schedule_is_cut_in_its_own_order(mlp: Path, tmp_path: Path) -> None:
    compiled = hyperion.compile(mlp, input_shapes={"x": [4, MLP_HIDDEN]})
    from_compiled = hyperion.partition(compiled, 2)
    compiled.schedule.save(tmp_path / "mlp.schedule.json")
    from_schedule = hyperion.partition(hyperion.Schedule.load(tmp_path / "mlp.schedule.json"), 2)
    order = tuple(step.node for step in compiled.schedule.steps)
    assert sum((s.nodes for s in from_compiled.stages), ()) == order
    assert [s.nodes for s in from_schedule.stages] == [s.nodes for s in from_compiled.stages]


@pytest.mark.parametrize(("options", "match"), [
    ({"stages": 0}, "stages: expected an integer from 1"),
    ({"stages": 99}, "stages: expected an integer from 1 to the model's 12 steps"),
    ({"stages": 2, "balance": "flops"}, "balance: expected 'time' or 'bytes'"),
    ({"stages": 2, "memory_limit_per_stage": "lots"}, "memory_limit_per_stage"),
])
def test_bad_options_are_refused_by_name(mlp: Path, options: dict, match: str) -> None:
    with pytest.raises(hyperion.OptionError, match=match):
        hyperion.partition(mlp, input_shapes={"x": [4, MLP_HIDDEN]}, **options)
