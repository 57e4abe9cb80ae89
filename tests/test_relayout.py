"""Relaid segments: fed weights built once through onnxruntime's optimizer, then mapped.

A fed segment is built with its weights as constants, so that onnxruntime packs its
MatMul/Gemm weights, re-lays convolution weights for its NCHWc kernels and folds
BatchNormalization in, writing all of it to a file; the segment's persistent session
maps that file, and every run drops the mapped pages again (hyperion/runtime/relayout.py,
hyperion/runtime/pages.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import hyperion
from fixtures.streaming_mlp import build_streaming_mlp
from hyperion.runtime import pages
from tests.conftest import float_error, reference_outputs, run_python


def conv_net(folder: Path, channels: int, layers: int, size: int, seed: int = 0) -> Path:
    """Conv -> BatchNormalization -> Relu, ``layers`` times, weights in an external-data file."""
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    previous = "x"
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        for name, values in (("scale", rng.uniform(0.5, 1.5, channels)), ("bias", rng.normal(0, 0.1, channels)),
                             ("mean", rng.normal(0, 0.1, channels)), ("var", rng.uniform(0.5, 1.5, channels))):
            weights.append(numpy_helper.from_array(values.astype(np.float32), f"{name}{i}"))
        nodes += [helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("BatchNormalization", [f"c{i}", f"scale{i}", f"bias{i}", f"mean{i}", f"var{i}"],
                                   [f"b{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
        previous = f"r{i}"
    graph = helper.make_graph(nodes, "convs",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, channels, size, size])],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "convs.onnx"
    onnx.save(model, path, save_as_external_data=True, location="convs.onnx.data", size_threshold=1024)
    return path


def _float64_outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    (result,) = ReferenceEvaluator(model).run(None, {"x": x.astype(np.float64)})
    return {model.graph.output[0].name: result}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("HYPERION_CACHE_DIR", str(folder))
    return folder


def test_a_fed_cnn_is_relaid_once_and_stays_within_onnxruntimes_error(tmp_path: Path, cache: Path) -> None:
    path = conv_net(tmp_path, channels=64, layers=4, size=16)
    x = np.random.default_rng(1).standard_normal((1, 64, 16, 16)).astype(np.float32)
    compiled = hyperion.compile(path, memory_limit="1.2MB", mode="memory_opt")
    relaid = [s for s in compiled.schedule.segments if s.relaid]
    assert relaid and all(s.fed_weights and s.persistent for s in relaid)
    got = compiled.run({"x": x})
    compiled.run({"x": x})
    assert compiled.stats.sessions.built == 0          # built once, on the first run

    optimized = [onnx.load(p, load_external_data=False) for p in sorted(cache.glob("relaid/*/segment.onnx"))]
    assert len(optimized) == len(relaid)
    ops = {(n.domain, n.op_type) for m in optimized for n in m.graph.node}
    assert ("", "BatchNormalization") not in ops        # folded into the convolutions
    assert ("", "Conv") not in ops and {d for d, _ in ops} & {"com.microsoft.nchwc", "com.microsoft"}

    exact = _float64_outputs(path, x)
    plain = float_error(reference_outputs(str(path), {"x": x}), exact)
    assert float_error(got, exact) <= 2 * plain

    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("relaid/*/*")}
    again = hyperion.compile(path, memory_limit="1.2MB", mode="memory_opt")
    np.testing.assert_array_equal(again.run({"x": x})[next(iter(got))], got[next(iter(got))])
    assert {p: p.stat().st_mtime_ns for p in cache.glob("relaid/*/*")} == stamps   # the cache is reused


def test_the_plan_counts_the_optimizers_copy_while_a_relaid_session_is_built(tmp_path: Path, cache: Path) -> None:
    path = conv_net(tmp_path, channels=64, layers=4, size=16)
    compiled = hyperion.compile(path, memory_limit="1.2MB", mode="memory_opt")
    schedule = compiled.schedule
    for segment in schedule.segments:
        if segment.relaid:
            weights = sum(schedule.tensors[w].bytes or 0 for w in segment.weights)
            convolution_weights = sum(schedule.tensors[w].bytes or 0 for w in segment.fed_weights
                                      if w.startswith("w"))
            assert segment.loading_bytes >= weights + convolution_weights
    assert schedule.peak_bytes <= 1_200_000
    # With more room the segments grow, and each still counts the copy.
    roomy = hyperion.compile(path, memory_limit="4MB", mode="memory_opt")
    assert len(roomy.schedule.segments) <= len(schedule.segments)


def test_a_cap_too_small_for_the_copy_feeds_plainly_rather_than_refusing(tmp_path: Path, cache: Path) -> None:
    path = conv_net(tmp_path, channels=64, layers=2, size=16)
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(path, memory_limit=1, mode="memory_opt")
    smallest = hyperion.compile(path, memory_limit=refused.value.smallest_limit_bytes, mode="memory_opt")
    segments = smallest.schedule.segments
    assert any(s.fed_weights for s in segments) and not any(s.relaid for s in segments)
    x = {"x": np.ones((1, 64, 16, 16), np.float32)}
    assert float_error(smallest.run(x), _float64_outputs(path, x["x"])) <= 2 * float_error(
        reference_outputs(str(path), x), _float64_outputs(path, x["x"]))


RELAID_RSS = """
import json, sys
import numpy as np
import hyperion, onnxruntime
from hyperion.tools.rss import peak_rss_bytes
path, limit = sys.argv[1], int(sys.argv[2])
baseline = peak_rss_bytes()
compiled = hyperion.compile(path, memory_limit=limit, mode="memory_opt")
x = {"x": np.ones((1, 512, 7, 7), np.float32)}
compiled.run(x)
compiled.run(x)
print(json.dumps({"over": peak_rss_bytes() - baseline,
                  "relaid": sum(s.relaid for s in compiled.schedule.segments),
                  "built": compiled.stats.sessions.built}))
"""


MLP_RSS = """
import json, sys
import numpy as np
import hyperion, onnxruntime
from hyperion.tools.rss import peak_rss_bytes
path, limit, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
baseline = peak_rss_bytes()
compiled = hyperion.compile(path, memory_limit=limit, mode="memory_opt", input_shapes={"x": [8, hidden]})
x = {"x": np.ones((8, hidden), np.float32)}
compiled.run(x)
compiled.run(x)
print(json.dumps({"over": peak_rss_bytes() - baseline,
                  "relaid": sum(s.relaid for s in compiled.schedule.segments),
                  "relaid_tiles": sum(s.tiles is not None and s.tiles.relaid for s in compiled.schedule.steps),
                  "segments": len(compiled.schedule.segments), "built": compiled.stats.sessions.built}))
"""


def test_relaid_matmuls_run_onnxruntimes_packed_kernels_bit_for_bit(tmp_path: Path, cache: Path) -> None:
    """A MatMul chain fed under a cap runs each segment as plain onnxruntime runs the model:
    weights packed once, mapped from the optimizer's file -- the same arithmetic, so the
    same bits (no fusion crosses a MatMul -> Relu boundary)."""
    path = build_streaming_mlp(tmp_path / "mlp.onnx", layers=6, hidden=512)
    x = {"x": np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32)}
    compiled = hyperion.compile(path, memory_limit="5MB", mode="memory_opt", input_shapes={"x": [4, 512]})
    segments = compiled.schedule.segments
    assert len(segments) > 1 and all(s.relaid for s in segments if s.fed_weights)
    got = compiled.run(x)
    np.testing.assert_array_equal(got["y"], reference_outputs(str(path), x)["y"])
    written = sum(p.stat().st_size for p in cache.glob("relaid/*/segment.data"))
    assert written >= 2 * 6 * 512 * 512 * 4   # every weight as read, and packed
    compiled.run(x)
    assert compiled.stats.sessions.built == 0


def test_a_relaid_mlp_keeps_the_rss_promise_in_a_fresh_process(tmp_path: Path, cache: Path) -> None:
    """48 MB of MatMul weights under a 16 MiB cap: each segment's packed weights are mapped
    while it runs and dropped after it."""
    path = build_streaming_mlp(tmp_path / "mlp.onnx", layers=12, hidden=1024)
    limit = 16 << 20
    result = json.loads(run_python(MLP_RSS, str(path), str(limit), "1024"))
    assert result["relaid"] >= 3 and result["built"] == 0
    assert result["over"] <= limit + (32 << 20), f"{result['over'] / 2**20:.1f} MiB over the import baseline"


def test_relaid_tiles_run_packed_kernels_bit_for_bit_and_read_nothing_once_built(tmp_path: Path, cache: Path) -> None:
    """Weights of 16 MiB under a 40 MB cap fit fed whole, unpacked, but not relaid whole (three
    times over while built): each MatMul runs as relaid tiles -- packed once, each tile's
    file mapped by a session of its own -- the same kernels as plain onnxruntime's."""
    path = build_streaming_mlp(tmp_path / "mlp.onnx", layers=3, hidden=2048)
    x = {"x": np.random.default_rng(4).standard_normal((8, 2048)).astype(np.float32)}
    compiled = hyperion.compile(path, memory_limit="40MB", mode="memory_opt", input_shapes={"x": [8, 2048]})
    tiles = [step.tiles for step in compiled.schedule.steps if step.tiles is not None]
    assert len(tiles) == 3 and all(t.relaid and not t.fed and len(t.bounds) > 2 for t in tiles)
    assert compiled.schedule.packed_kernels
    expected = reference_outputs(str(path), x)["y"]
    np.testing.assert_array_equal(compiled.run(x)["y"], expected)
    np.testing.assert_array_equal(compiled.run(x)["y"], expected)
    assert compiled.stats.sessions.built == 0 and compiled.stats.fed_bytes == 0
    assert len(list(cache.glob("relaid/*/segment.data"))) == sum(len(t.bounds) - 1 for t in tiles)


def test_relaid_convolution_tiles_are_built_once_and_stay_within_onnxruntimes_error(tmp_path: Path,
                                                                                    cache: Path) -> None:
    """9 MiB convolution weights under an 8 MB cap: each Conv in relaid tiles (OIHW blocks of
    output channels, re-laid for NCHWc once), no session built per tile and run."""
    path = conv_net(tmp_path, channels=512, layers=2, size=7)
    x = {"x": np.random.default_rng(5).standard_normal((1, 512, 7, 7)).astype(np.float32)}
    compiled = hyperion.compile(path, memory_limit="8MB", mode="memory_opt")
    tiles = [step.tiles for step in compiled.schedule.steps if step.tiles is not None]
    assert len(tiles) == 2 and all(t.relaid and len(t.bounds) > 2 for t in tiles)
    got = compiled.run(x)
    again = compiled.run(x)
    assert compiled.stats.sessions.built == 0
    name = next(iter(got))
    np.testing.assert_array_equal(again[name], got[name])
    exact = _float64_outputs(path, x["x"])
    assert float_error(got, exact) <= 2 * float_error(reference_outputs(str(path), x), exact)


def test_relaid_tiles_of_a_weight_twice_the_cap_keep_the_rss_promise(tmp_path: Path, cache: Path) -> None:
    """One 64 MiB weight under a 32 MiB cap: tiles narrow enough to be built relaid."""
    path = build_streaming_mlp(tmp_path / "mlp.onnx", layers=1, hidden=4096)
    limit = 32 << 20
    result = json.loads(run_python(MLP_RSS, str(path), str(limit), "4096"))
    assert result["relaid_tiles"] == 1 and result["built"] == 0
    assert result["over"] <= limit + (32 << 20), f"{result['over'] / 2**20:.1f} MiB over the import baseline"


def test_pages_finds_a_files_mappings_and_what_was_written_into_them(tmp_path: Path) -> None:
    import mmap

    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4096)        # 1 MiB
    with path.open("rb") as handle:
        clean = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        copied = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    ranges = pages.mapped_ranges(path)
    assert len(ranges) == 2 and sum(r.length for r in ranges) == 2 * (1 << 20)
    assert pages.written_bytes(ranges) == 0
    copied[0] = 7                                      # a private copy of one page
    assert pages.written_bytes(ranges) >= mmap.PAGESIZE
    assert sum(clean[:4096]) == sum(range(256)) * 16
    pages.drop([r for r in ranges if pages.written_bytes([r]) == 0])   # the clean mapping: read again from the file
    assert clean[1] == 1 and copied[0] == 7
    clean.close()
    copied.close()


def test_a_relaid_plan_keeps_the_rss_promise_in_a_fresh_process(tmp_path: Path, cache: Path) -> None:
    """94 MB of convolution weights under a 64 MiB cap: the optimizer's copies are made one
    segment at a time, and every run feeds the re-laid weights and lets them go."""
    path = conv_net(tmp_path, channels=512, layers=10, size=7)
    limit = 64 << 20
    result = json.loads(run_python(RELAID_RSS, str(path), str(limit)))
    assert result["relaid"] >= 3 and result["built"] == 0
    assert result["over"] <= limit + (32 << 20), f"{result['over'] / 2**20:.1f} MiB over the import baseline"


def test_a_saved_relaid_schedule_loads_and_runs_the_same(tmp_path: Path, cache: Path) -> None:
    path = conv_net(tmp_path, channels=64, layers=4, size=16)
    x = {"x": np.random.default_rng(2).standard_normal((1, 64, 16, 16)).astype(np.float32)}
    compiled = hyperion.compile(path, memory_limit="1.2MB", mode="memory_opt")
    expected = compiled.run(x)
    compiled.schedule.save(tmp_path / "plan.json")
    loaded = hyperion.load(path, tmp_path / "plan.json")
    assert [s.relaid for s in loaded.schedule.segments] == [s.relaid for s in compiled.schedule.segments]
    for name, value in loaded.run(x).items():
        np.testing.assert_array_equal(value, expected[name])
