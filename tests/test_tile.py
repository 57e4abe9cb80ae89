"""Operator tiling: a MatMul, Gemm or Conv step bigger than the cap runs tile by tile,
within the cap, with onnxruntime's outputs bit for bit for MatMul and Gemm (tiles split an
axis no output element is summed over, and each tile's weight is packed as the whole weight
is); Conv, and unpacked MatMul, within the float32 error bound of any summation order
against float64."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import hyperion
from hyperion.passes.tile_ops import TILE_UNIT
from hyperion.schedule import Tiles
from tests.conftest import reference_outputs, run_python

# Packed, as plain onnxruntime packs: the plans whose outputs are compared bit for bit. (Fed,
# the default under a cap, tiles are bounded: test_unpacked_tiles_are_within_...)
EXAMPLES = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _model(node: onnx.NodeProto, inputs: dict[str, list[int]], output: str, weights: dict[str, np.ndarray]
           ) -> onnx.ModelProto:
    """One op, then a Relu (so the tiled step has a reader inside the model), as ONNX."""
    graph = helper.make_graph(
        [node, helper.make_node("Relu", [output], ["y"], name="relu")], "tile",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _saved(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "op.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="op.onnx.data", size_threshold=0)
    return path


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


UNIT_ROUNDOFF = 2.0**-24   # float32


def _check_under_caps(path: Path, feeds: dict[str, np.ndarray], weight_bytes: int, fraction: float,
                      exact: tuple[np.ndarray, np.ndarray] | None = None, prepack: bool = True) -> Tiles:
    """Compile at a cap between the smallest feasible and the weight's size: the step is
    tiled, the plan fits, and the outputs are onnxruntime's exactly -- or, given the float64
    result and the float32 error bound of any summation order, ``exact``, within it (every
    run alike: ``prepack=False``, a fed plan, runs its tiles in sessions kept across runs)."""
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(path, memory_limit=1, mode="memory_opt", prepack_weights=prepack)
    smallest = refused.value.smallest_limit_bytes
    assert smallest < weight_bytes       # the cap falls below the weight: an output plus one tile
    cap = int(smallest + fraction * (weight_bytes - smallest))
    cm = hyperion.compile(path, memory_limit=cap, mode="memory_opt", prepack_weights=prepack)
    tiled = [step for step in cm.schedule.steps if step.tiles is not None]
    assert len(tiled) == 1 and cm.schedule.peak_bytes <= cap
    tiles = tiled[0].tiles
    assert len(tiles.bounds) > 2  # more than one tile: the weight alone exceeds the cap
    assert all(b - a == tiles.bounds[1] for a, b in zip(tiles.bounds, tiles.bounds[1:-1], strict=False))
    assert tiles.bounds[1] % TILE_UNIT == 0 or tiles.bounds[1] == tiles.bounds[-1]
    plain = reference_outputs(path, feeds)["y"]
    if exact is None:
        np.testing.assert_array_equal(cm.run(feeds)["y"], plain)
    else:
        value, bound = exact
        assert (np.abs(plain - value) <= bound).all()   # the reference and its bound hold for onnxruntime
        first = cm.run(feeds)["y"]
        assert (np.abs(first - value) <= bound).all()
        np.testing.assert_array_equal(cm.run(feeds)["y"], first)
    return tiles


@EXAMPLES
@given(rows=st.integers(1, 12), k=st.integers(64, 160), n=st.integers(300, 700), batched=st.booleans(),
       fraction=st.floats(0.0, 0.6))
def test_matmul_by_output_columns(tmp_path: Path, rows: int, k: int, n: int, batched: bool, fraction: float) -> None:
    a_shape = [1, rows, k] if batched else [rows, k]
    weight = _random((k, n), 1)
    model = _model(helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), {"a": a_shape}, "m", {"w": weight})
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    _check_under_caps(_saved(model, folder), {"a": _random(tuple(a_shape), 2)}, weight.nbytes, fraction)


@EXAMPLES
@given(rows=st.integers(1, 12), k=st.integers(64, 160), n=st.integers(300, 700), trans_b=st.booleans(),
       bias=st.sampled_from(["none", "per column", "one value"]), fraction=st.floats(0.0, 0.6))
def test_gemm_by_output_columns(tmp_path: Path, rows: int, k: int, n: int, trans_b: bool, bias: str,
                                fraction: float) -> None:
    weight = _random((n, k) if trans_b else (k, n), 3)
    weights = {"w": weight}
    inputs = ["a", "w"]
    if bias != "none":
        weights["c"] = _random((n,) if bias == "per column" else (1,), 4)
        inputs.append("c")
    node = helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=int(trans_b), alpha=0.5, beta=2.0)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    model = _model(node, {"a": [rows, k]}, "g", weights)
    _check_under_caps(_saved(model, folder), {"a": _random((rows, k), 5)}, weight.nbytes, fraction)


@EXAMPLES
@given(batch=st.integers(1, 2), channels=st.integers(64, 96), out_channels=st.integers(96, 192),
       size=st.integers(3, 6), bias=st.sampled_from(["none", "weight", "through Identity"]),
       fraction=st.floats(0.0, 0.6), prepack=st.booleans())
def test_conv_by_output_channels(tmp_path: Path, batch: int, channels: int, out_channels: int, size: int,
                                 bias: str, fraction: float, prepack: bool) -> None:
    # Fed from two images on, the im2col buffers the plan counts (one per thread) outweigh
    # these weights: no cap below the weight is left to tile for.
    assume(prepack or batch == 1)
    weight = _random((out_channels, channels, 3, 3), 6)
    weights = {"w": weight}
    inputs = ["x", "w"]
    if bias != "none":
        weights["b"] = _random((out_channels,), 7)
        inputs.append("b" if bias == "weight" else "shared_b")   # exporters share biases through Identity
    node = helper.make_node("Conv", inputs, ["c"], name="conv", pads=[1, 1, 1, 1])
    x_shape = (batch, channels, size, size)
    model = _model(node, {"x": list(x_shape)}, "c", weights)
    if bias == "through Identity":
        model.graph.node.insert(0, helper.make_node("Identity", ["b"], ["shared_b"], name="share"))
    path = _saved(model, Path(tempfile.mkdtemp(dir=tmp_path)))
    x = _random(x_shape, 8)
    # Not always bit-exact: with several threads, MLAS partitions a small convolution's work
    # by its channel count (seen at 33 input channels, 6x6, 2 threads), so a tile of output
    # channels can sum in another order. Bounded against float64 instead: a dot product of
    # n terms summed in any order in float32 is within n * u * sum |terms| of the exact one.
    terms = channels * 9 + (bias != "none")
    value = _conv3x3_float64(x, weight, weights.get("b"))
    magnitude = _conv3x3_float64(np.abs(x), np.abs(weight), None if bias == "none" else np.abs(weights["b"]),
                                 relu=False)
    exact = (value, terms * UNIT_ROUNDOFF * magnitude * 1.01)
    tiles = _check_under_caps(path, {"x": x}, weight.nbytes, fraction, exact, prepack)
    assert tiles.in_place == (batch == 1) and tiles.output_axis == 1 and tiles.weight_axis == 0
    # Fed (unpacked), the tiles are inputs of a session kept per tile width; packed, each
    # tile is a constant its own session re-lays, as onnxruntime does the whole weight.
    assert tiles.fed == (not prepack) and not tiles.relaid


def _conv3x3_float64(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, relu: bool = True) -> np.ndarray:
    """Relu(Conv(x, weight, bias)), 3x3 with padding 1, in float64 (without the Relu: ``relu=False``)."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))   # b c h w i j
    out = np.einsum("bchwij,ocij->bohw", windows, weight.astype(np.float64))
    if bias is not None:
        out += bias.astype(np.float64)[None, :, None, None]
    return np.maximum(out, 0) if relu else out


def test_the_smallest_cap_is_the_output_plus_one_tile(tmp_path: Path) -> None:
    rows, k, n = 4, 256, 4096                    # a 4 MiB weight, a 64 KiB output
    weight = _random((k, n), 9)
    model = _model(helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), {"a": [rows, k]}, "m", {"w": weight})
    path = _saved(model, tmp_path)
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(path, memory_limit=1, mode="memory_opt", prepack_weights=True)
    smallest = refused.value.smallest_limit_bytes
    one_tile = k * TILE_UNIT * 4
    # The MatMul: its input, its output, one weight tile (read, and packed) and one output
    # tile; or the Relu after it: its input and output.
    matmul = rows * k * 4 + rows * n * 4 + 3 * one_tile + rows * TILE_UNIT * 4
    assert smallest <= max(matmul, 2 * rows * n * 4)
    assert smallest < weight.nbytes / 16
    cm = hyperion.compile(path, memory_limit=smallest, mode="memory_opt", prepack_weights=True)
    feeds = {"a": _random((rows, k), 10)}
    np.testing.assert_array_equal(cm.run(feeds)["y"], reference_outputs(path, feeds)["y"])


def test_a_saved_tiled_schedule_runs_and_an_edited_one_is_refused(tmp_path: Path) -> None:
    weight = _random((64, 512), 11)
    model = _model(helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), {"a": [8, 64]}, "m", {"w": weight})
    path = _saved(model, tmp_path)
    cm = hyperion.compile(path, memory_limit=weight.nbytes // 3, mode="memory_opt", prepack_weights=True)
    saved = cm.schedule.save(tmp_path / "op.schedule.json")
    loaded = hyperion.load(path, saved)
    feeds = {"a": _random((8, 64), 12)}
    np.testing.assert_array_equal(loaded.run(feeds)["y"], reference_outputs(path, feeds)["y"])
    data = cm.schedule.to_dict()
    step = next(s for s in data["steps"] if s["tiles"] is not None)
    step["tiles"]["bounds"][-1] += 16   # reads past the weight
    edited = tmp_path / "edited.json"
    edited.write_text(__import__("json").dumps(data))
    with pytest.raises(hyperion.ScheduleError, match="tiles"):
        hyperion.load(path, edited)


def test_no_tiles_without_a_cap_or_in_normal_mode(tmp_path: Path) -> None:
    weight = _random((64, 512), 13)
    model = _model(helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), {"a": [8, 64]}, "m", {"w": weight})
    path = _saved(model, tmp_path)
    assert all(s.tiles is None for s in hyperion.compile(path, mode="memory_opt", prepack_weights=True).schedule.steps)
    with pytest.raises(hyperion.MemoryLimitError):
        hyperion.compile(path, memory_limit=weight.nbytes // 3, mode="normal")


@EXAMPLES
@given(rows=st.integers(1, 12), k=st.integers(64, 160), n=st.integers(300, 700), fraction=st.floats(0.0, 0.6))
def test_unpacked_tiles_are_within_onnxruntimes_own_error(tmp_path: Path, rows: int, k: int, n: int,
                                                          fraction: float) -> None:
    # Unpacked (prepack_weights=False), onnxruntime's GEMM blocks a tile's columns otherwise
    # than the whole weight's when more than one row is multiplied: not bit-exact, so the
    # error against float64 is bounded as for any summation order (k * u * sum |terms|).
    # One row: each tile is written straight into its slice of the output.
    weight = _random((k, n), 14)
    model = _model(helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), {"a": [rows, k]}, "m", {"w": weight})
    path = _saved(model, Path(tempfile.mkdtemp(dir=tmp_path)))
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(path, memory_limit=1, mode="memory_opt", prepack_weights=False)
    smallest = refused.value.smallest_limit_bytes
    cap = int(smallest + fraction * (weight.nbytes - smallest))
    cm = hyperion.compile(path, memory_limit=cap, mode="memory_opt", prepack_weights=False)
    tiled = [step.tiles for step in cm.schedule.steps if step.tiles is not None]
    assert cm.schedule.peak_bytes <= cap and tiled
    # Kept sessions: one per tile width, each tile an input (fed), or one per tile, packed (relaid).
    assert all(t.fed != t.relaid for t in tiled)
    a = _random((rows, k), 15)
    exact = np.maximum(a.astype(np.float64) @ weight.astype(np.float64), 0)
    bound = k * UNIT_ROUNDOFF * (np.abs(a).astype(np.float64) @ np.abs(weight).astype(np.float64)) * 1.01
    plain = reference_outputs(path, {"a": a}, prepack_weights=False)["y"]
    assert (np.abs(plain - exact) <= bound).all()
    first = cm.run({"a": a})["y"]
    assert (np.abs(first - exact) <= bound).all()
    np.testing.assert_array_equal(cm.run({"a": a})["y"], first)   # the kept sessions, run again


# -- the real process --------------------------------------------------------------------
_BASELINE = """
from hyperion.tools.rss import peak_rss_bytes
import hyperion, onnxruntime
print(peak_rss_bytes())
"""
_RUN = """
import json, sys
import numpy as np
import hyperion
from hyperion.tools.rss import peak_rss_bytes
cm = hyperion.compile(sys.argv[1], memory_limit=int(sys.argv[2]), mode="memory_opt", prepack_weights=True)
a = np.random.default_rng(16).standard_normal((1, 64, 768)).astype(np.float32)
for _ in range(2):
    y = cm.run({"a": a})["y"]
np.save(sys.argv[3], y)
tiles = [len(s.tiles.bounds) - 1 for s in cm.schedule.steps if s.tiles is not None]
print(json.dumps({"rss": peak_rss_bytes(), "peak_bytes": cm.schedule.peak_bytes, "tiles": tiles}))
"""



@pytest.mark.slow
def test_a_tiled_projection_over_a_100_mb_weight_keeps_rss_under_the_cap(tmp_path: Path) -> None:
    import json

    weight = _random((768, 32768), 17)           # 100 MB, as a vocabulary projection's
    model = _model(helper.make_node("MatMul", ["a", "w"], ["m"], name="logits"), {"a": [1, 64, 768]}, "m",
                   {"w": weight})
    path = _saved(model, tmp_path)
    cap = 40 * 2**20                             # the output (8 MiB) twice, its input, tiles
    baseline = int(run_python(_BASELINE))
    report = json.loads(run_python(_RUN, str(path), str(cap), str(tmp_path / "y.npy")))
    above = report["rss"] - baseline
    print(f"\npeak RSS {above / 2**20:.1f} MiB above the import baseline; cap {cap / 2**20:.0f} MiB, "
          f"accounted {report['peak_bytes'] / 2**20:.1f} MiB, tiles {report['tiles']}")
    assert report["peak_bytes"] <= cap and report["tiles"] and report["tiles"][0] > 1
    assert above <= cap + 32 * 2**20             # SPEC's promise: the cap plus 32 MiB
    a = np.random.default_rng(16).standard_normal((1, 64, 768)).astype(np.float32)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), reference_outputs(path, {"a": a})["y"])


def test_compile_prints_the_smallest_limit_and_inspect_lists_the_tiles(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from hyperion.tools.cli import main

    weight = _random((64, 512), 18)
    model = _model(helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), {"a": [8, 64]}, "m", {"w": weight})
    path = _saved(model, tmp_path)
    assert main(["compile", str(path), "--smallest-limit", "-q"]) == 0
    printed = capsys.readouterr().out
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(path, memory_limit=1)
    assert f"smallest limit {refused.value.smallest_limit_bytes} bytes" in printed
    assert f"set by node {refused.value.node!r}" in printed and refused.value.smallest_limit_bytes < weight.nbytes
    assert not list(tmp_path.glob("*.schedule.json"))            # nothing saved
    schedule = tmp_path / "op.schedule.json"
    assert main(["compile", str(path), "--memory-limit", str(weight.nbytes // 3), "-o", str(schedule), "-q"]) == 0
    assert main(["inspect", str(schedule)]) == 0
    shown = capsys.readouterr().out
    assert "tile 0/" in shown and "from w[axis 1: 0:" in shown and "split steps  1 tiled" in shown


@pytest.mark.parametrize("axis, skipped", [(0, False), (1, False), (1, True)])
def test_weight_tiles_read_from_the_file_are_the_weights_slices(tmp_path: Path, axis: int, skipped: bool) -> None:
    from hyperion.runtime.tile_reads import COALESCED_ROWS, WeightTileReader

    # More rows than one coalesced read takes, at an offset into the file.
    weight = _random((2 * COALESCED_ROWS + 37, 40), 17)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 12 + weight.tobytes())
    buffer = np.full(weight.size, np.nan, np.float32)
    skip = np.empty(weight.shape[1] * 4, np.uint8) if skipped else None
    with WeightTileReader(path, 12, "w", weight.shape, axis) as reader:
        for start, stop in ((0, 16), (16, 32), (32, 40), (0, 40)):
            tile = reader(start, stop, buffer, skip)
            np.testing.assert_array_equal(tile, weight[(slice(None),) * axis + (slice(start, stop),)])
            assert tile.flags.c_contiguous and np.shares_memory(tile, buffer)
    with WeightTileReader(path, 12 + 8, "w", weight.shape, axis) as reader, \
            pytest.raises(hyperion.ModelLoadError, match="truncated"):
        reader(0, weight.shape[axis], buffer, skip)


def test_fed_column_tiles_are_read_from_a_tile_major_copy(tmp_path: Path) -> None:
    from hyperion.runtime.tile_reads import tile_major_copy

    rows, k, n = 3, 96, 400
    weight = _random((k, n), 18)
    model = _model(helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), {"a": [rows, k]}, "m", {"w": weight})
    path = _saved(model, tmp_path)
    with pytest.raises(hyperion.MemoryLimitError) as refused:   # the smallest cap: too tight to relay tiles
        hyperion.compile(path, memory_limit=1, mode="memory_opt", prepack_weights=False)
    cap = refused.value.smallest_limit_bytes
    cm = hyperion.compile(path, memory_limit=cap, mode="memory_opt", prepack_weights=False)
    tiles = next(step.tiles for step in cm.schedule.steps if step.tiles is not None)
    assert tiles.fed and tiles.tile_major and tiles.weight_axis == 1 and len(tiles.bounds) > 2
    copy = tile_major_copy(tmp_path / "op.onnx.data", 0, weight.nbytes, tiles)
    assert not copy.exists()
    a = _random((rows, k), 19)
    first = cm.run({"a": a})["y"]
    # Written on the first run: the tiles one after another, each [k, width] in row-major order.
    edges = zip(tiles.bounds, tiles.bounds[1:], strict=False)
    laid_out = np.concatenate([weight[:, start:stop].ravel() for start, stop in edges])
    np.testing.assert_array_equal(np.fromfile(copy, np.float32), laid_out)
    exact = np.maximum(a.astype(np.float64) @ weight.astype(np.float64), 0)
    bound = k * UNIT_ROUNDOFF * (np.abs(a).astype(np.float64) @ np.abs(weight).astype(np.float64)) * 1.01
    assert (np.abs(first - exact) <= bound).all()
    # Compiled again, the plan reads the copy; once the weight's file changed, a new copy is made.
    again = hyperion.compile(path, memory_limit=cap, mode="memory_opt", prepack_weights=False)
    np.testing.assert_array_equal(again.run({"a": a})["y"], first)
    _saved(_model(helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), {"a": [rows, k]}, "m",
                  {"w": 2 * weight}), tmp_path)
    doubled = hyperion.compile(path, memory_limit=cap, mode="memory_opt", prepack_weights=False)
    np.testing.assert_allclose(doubled.run({"a": a})["y"], 2 * first, rtol=1e-5, atol=1e-5)
