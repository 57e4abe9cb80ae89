"""hyperion.ray on a local Ray cluster this module starts (2 CPUs) and shuts down: pipelines of 2
and 3 stage actors give onnxruntime's outputs, each actor within its cap + 32 MiB of RSS; a stage
killed mid-run is a typed error or a retried, correct result; Ray Data map_batches; and a
Ray-less install imports hyperion and says which extra hyperion.ray needs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import hyperion
from fixtures.streaming_mlp import DEFAULT_HIDDEN, build_streaming_mlp, weight_bytes
from hyperion.runtime import session_options
from tests.conftest import REPO, assert_outputs_equal, example_feeds, fixture_path, reference_outputs

ALLOWANCE_BYTES = 32 * 2**20     # the cap's promise: RSS above baseline <= cap + 32 MiB
BIG_LAYERS = 6                   # 6 x 20 MB weights: 120 MB
BIG_CAP = 64 * 2**20             # two layers' weights resident per stage, with room to pack one
RUN_TIMEOUT_S = 120.0

BLOCK_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray' (blocked)")
sys.meta_path.insert(0, NoRay())
import hyperion
assert "ray" not in sys.modules, "importing hyperion imported ray"
try:
    import hyperion.ray
except ImportError as exc:
    assert isinstance(exc, hyperion.HyperionError), type(exc)
    print(exc)
else:
    raise SystemExit("hyperion.ray imported without ray")
"""


def test_without_ray_hyperion_imports_and_hyperion_ray_names_the_extra() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK_RAY], capture_output=True, text=True, cwd=REPO, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'hyperion[ray]'" in done.stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    import hyperion.ray  # noqa: F401  (the tests below use it as hyperion.ray)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_streaming_mlp(tmp_path_factory.mktemp("big") / "mlp.onnx", layers=BIG_LAYERS)


@pytest.mark.parametrize(("name", "stages", "micro_batches"), [
    ("mlp", 2, 1), ("transformer_block", 3, 1), ("encoder_outputs", 3, 2), ("demo", 2, 4)])
def test_a_pipeline_of_stage_actors_gives_onnxruntimes_outputs(cluster: object, name: str, stages: int,
                                                               micro_batches: int) -> None:
    feeds = example_feeds(name, batch=micro_batches)
    with hyperion.ray.RayPipeline(fixture_path(name), stages, "64MB", micro_batches, timeout_s=RUN_TIMEOUT_S) as pipe:
        ours = pipe.run(feeds)
        assert len(pipe.actors) == stages and pipe.stage_modes() == ["normal"] * stages
    # Bit for bit: onnxruntime on the same micro-batches (a GEMM of 1 row rounds unlike one of 2);
    # to the tolerance: onnxruntime on the whole batch.
    assert_outputs_equal(ours, reference_outputs(fixture_path(name), feeds))
    if name != "demo":   # a cut through a fused Conv runs it unfused: equal to the tolerance only
        for output, want in per_micro_batch_reference(fixture_path(name), feeds, micro_batches).items():
            np.testing.assert_array_equal(ours[output], want, err_msg=output)


def per_micro_batch_reference(model: Path, feeds: dict[str, np.ndarray], parts: int,
                              prepack_weights: bool = True) -> dict[str, np.ndarray]:
    """Plain onnxruntime on each micro-batch, outputs concatenated (with memory_opt's kernels,
    weights fed unpacked, when ``prepack_weights`` is False)."""
    split = [{k: v for k, v in zip(feeds, values, strict=True)}
             for values in zip(*(np.array_split(v, parts) for v in feeds.values()), strict=True)]
    outputs = [reference_outputs(model, part, prepack_weights=prepack_weights) for part in split]
    return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}


@pytest.mark.parametrize(("stages", "cap", "mode"), [(3, BIG_CAP, "normal"), (2, 48 * 2**20, "memory_opt")])
def test_a_120mb_model_in_stages_each_under_its_cap(cluster: object, big_model: Path, stages: int, cap: int,
                                                     mode: str) -> None:
    """Three stages hold two layers (40 MB) each, resident; two stages' shares (60 MB) do not
    fit 48 MiB, so their actors stream their weights -- each actor keeps to its cap itself."""
    assert weight_bytes(BIG_LAYERS) >= 100 * 10**6 and weight_bytes(BIG_LAYERS) > 1.5 * cap
    x = np.random.default_rng(0).standard_normal((8, DEFAULT_HIDDEN)).astype(np.float32)
    with hyperion.ray.RayPipeline(big_model, stages, cap, micro_batches=4, timeout_s=RUN_TIMEOUT_S) as pipe:
        for _ in range(2):   # the second run reuses every stage's session
            y = pipe.run({"x": x})["y"]
            assert pipe.plan is not None
            # With the GEMM kernels its stages run: packed, or -- a stage fed some plainly -- unpacked.
            packed = all(stage.schedule.packed_kernels for stage in pipe.plan.stages)
            expected = per_micro_batch_reference(big_model, {"x": x}, 4, prepack_weights=packed)
            np.testing.assert_array_equal(y, expected["y"])
        assert pipe.plan is not None and [len(s.weights) for s in pipe.plan.stages] == [BIG_LAYERS // stages] * stages
        assert pipe.stage_modes() == [mode] * stages
        peaks = pipe.stage_peak_rss_bytes()
    print(f"\n{stages} stages, {mode}: peak RSS above baseline (MiB):", [round(p / 2**20, 1) for p in peaks])
    assert all(peak <= cap + ALLOWANCE_BYTES for peak in peaks)
    if mode == "normal":   # each actor holds its third of the weights (40 MB), not the whole model
        assert all(peak >= 40 * 10**6 for peak in peaks)


def test_a_pipeline_runs_a_saved_partition(cluster: object, tmp_path: Path) -> None:
    plan = hyperion.partition(fixture_path("transformer_block"), 2, "16MB")
    path = plan.save(tmp_path / "block.partition.json")
    feeds = example_feeds("transformer_block")
    with hyperion.ray.RayPipeline(partition=path, timeout_s=RUN_TIMEOUT_S) as pipe:
        ours = pipe.run(feeds)
    for output, want in reference_outputs(fixture_path("transformer_block"), feeds).items():
        np.testing.assert_array_equal(ours[output], want, err_msg=output)


def _batches(count: int, batch: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((batch, DEFAULT_HIDDEN)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("max_restarts", [0, 1])
def test_a_stage_killed_mid_run_is_a_typed_error_or_a_retried_correct_result(cluster: object, big_model: Path,
                                                                             max_restarts: int) -> None:
    ray = cluster
    batches = _batches(16, 64)
    with hyperion.ray.RayPipeline(big_model, 3, BIG_CAP, max_restarts=max_restarts, timeout_s=RUN_TIMEOUT_S,
                                  input_shapes={"x": [64, DEFAULT_HIDDEN]}) as pipe:
        pending = pipe.submit(batches)
        first = pipe.collect(pending[:1])      # the run is under way: one micro-batch through every stage
        ray.kill(pipe.actors[1], no_restart=max_restarts == 0)   # type: ignore[attr-defined]
        started = time.monotonic()
        if max_restarts == 0:
            with pytest.raises(hyperion.StageFailedError, match="stage 1 died") as failed:
                pipe.collect(pending[1:])
            assert failed.value.stage == 1
        else:   # restarted (its stage compiled again) and its calls retried: every result right
            results = first + pipe.collect(pending[1:])
            session = ort.InferenceSession(str(big_model), session_options(), providers=["CPUExecutionProvider"])
            for feeds, result in zip(batches, results, strict=True):
                np.testing.assert_array_equal(result["y"], session.run(["y"], feeds)[0])
        assert time.monotonic() - started < RUN_TIMEOUT_S


def test_map_batches_runs_a_dataset_through_capped_actors(cluster: object, tmp_path: Path) -> None:
    import ray.data

    model = build_streaming_mlp(tmp_path / "mlp.onnx", layers=4, hidden=64)
    x = np.random.default_rng(3).standard_normal((40, 64)).astype(np.float32)
    cap = 4 * 2**20
    dataset = ray.data.from_numpy(x)
    rows = hyperion.ray.map_batches(dataset, model, memory_limit=cap, concurrency=2, batch_size=16).take_all()
    y = np.stack([row["y"] for row in rows])
    np.testing.assert_array_equal(y, reference_outputs(model, {"x": x})["y"])   # order kept, last batch of 8
    assert max(row["hyperion_peak_rss_bytes"] for row in rows) <= cap + ALLOWANCE_BYTES


def test_the_command_line_runs_a_model_as_pipeline_stages(cluster: object, capsys: pytest.CaptureFixture) -> None:
    from hyperion.tools.cli import main

    assert main(["run", str(fixture_path("mlp")), "--ray", "--stages", "2", "--memory-limit-per-stage", "1MB",
                 "--seed", "1", "--check"]) == 0
    out = capsys.readouterr().out
    assert "stage 0: steps 0-" in out and "stage 1: steps" in out and "mode normal" in out
    assert "check: outputs match plain onnxruntime" in out
    # The single-process cap does not apply to stages: refused as a usage error.
    assert main(["run", str(fixture_path("mlp")), "--ray", "--memory-limit", "1MB"]) == 2
    assert "--memory-limit-per-stage" in capsys.readouterr().err
