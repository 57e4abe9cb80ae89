"""Tensors computed from constants alone become weights at import (hyperion.frontend.fold):
the IR sees initializers where the model has ConstantOfShape (or a Transpose or Cast of a
weight), outputs equal onnxruntime's, a fill is written in chunks, the cache entry is
written once per model and a cache that cannot take it is a typed error naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hyperion
from hyperion.frontend import fold as fold_module
from hyperion.frontend import import_model, load_source
from hyperion.frontend.embedded import weights_folder
from hyperion.ir import ExecutionMode, TensorRole
from hyperion.planner import plan
from tests.conftest import assert_outputs_equal, reference_outputs, run_python

FILL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 256] x) => (float[1, 128] y) <int64[2] s = {256, 128}> {
    w = ConstantOfShape <value = float[1] {VALUE}> (s)
    y = MatMul (x, w)
}"""


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("HYPERION_CACHE_DIR", str(folder))
    return folder


def _fill_model(folder: Path, value: float = 0.5) -> Path:
    path = folder / f"fill_{value}.onnx"
    onnx.save(onnx.parser.parse_model(FILL.replace("VALUE", str(value))), str(path))
    return path


def _transposed_weight_model(folder: Path) -> Path:
    """y = x @ Transpose(Cast(w16)): a float16 weight cast and transposed at run time."""
    w16 = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),
         helper.make_node("Transpose", ["w32"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "transposed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w16, "w16")])
    path = folder / "transposed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _x(width: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, width)).astype(np.float32)


def test_a_fill_is_a_weight_and_normal_mode_equals_onnxruntime_bit_for_bit(tmp_path: Path) -> None:
    path = _fill_model(tmp_path)
    compiled = hyperion.compile(path, mode="normal")
    assert compiled.ir.tensors["w"].role is TensorRole.WEIGHT
    assert compiled.ir.tensors["w"].external is not None
    assert [node.op_type for node in compiled.ir.nodes.values()] == ["MatMul"]
    np.testing.assert_array_equal(compiled.run({"x": _x(256)})["y"], reference_outputs(path, {"x": _x(256)})["y"])


def test_under_a_cap_the_fill_is_fed_like_any_weight(tmp_path: Path) -> None:
    path = _fill_model(tmp_path)
    compiled = hyperion.compile(path, memory_limit=150_000, mode="memory_opt", weight_cache=0)  # streamed
    segment = next(s for s in compiled.schedule.segments if "w" in s.weights)
    assert segment.fold_constants and segment.fed_weights == ("w",)
    reference = reference_outputs(path, {"x": _x(256)}, prepack_weights=compiled.schedule.packed_kernels)
    assert_outputs_equal(compiled.run({"x": _x(256)}), reference)


SMALL = """<ir_version: 6, opset_import: ["" : 11]>
g (float[1, 8, 4, 4] x) => (float[1, 8, 4, 4] y) <int64[1] s = {8}> {
    scale = ConstantOfShape <value = float[1] {0.5}> (s)
    scale4 = Unsqueeze <axes = [1, 2]> (scale)
    shift = ConstantOfShape <value = float[1] {0.25}> (s)
    shift4 = Unsqueeze <axes = [1, 2]> (shift)
    scaled = Mul (x, scale4)
    y = Add (scaled, shift4)
}"""


def test_small_tensors_computed_from_constants_are_initializers_of_the_proto_not_steps(tmp_path: Path) -> None:
    """onnx's light models compute their BatchNormalization parameters so: as nodes, each
    would be a step whose session keeps bookkeeping across runs."""
    path = tmp_path / "small.onnx"
    onnx.save(onnx.parser.parse_model(SMALL), str(path))
    compiled = hyperion.compile(path, memory_limit=4096, mode="memory_opt")
    assert [step.op_type for step in compiled.schedule.steps] == ["Mul", "Add"]
    for name in ("scale4", "shift4"):
        assert compiled.ir.tensors[name].role is TensorRole.WEIGHT and compiled.ir.tensors[name].external is None
    x = np.random.default_rng(3).standard_normal((1, 8, 4, 4)).astype(np.float32)
    expected = reference_outputs(path, {"x": x})
    np.testing.assert_array_equal(compiled.run({"x": x})["y"], expected["y"])
    # A schedule planned while they were nodes still runs them as nodes.
    older = plan(import_model(fold_module.fold_constants(load_source(path, fold_constants=False), small=False)),
                 ExecutionMode.MEMORY_OPT, 4096)
    assert "ConstantOfShape" in [step.op_type for step in older.steps]
    np.testing.assert_array_equal(hyperion.load(path, older).run({"x": x})["y"], expected["y"])
    np.testing.assert_array_equal(hyperion.load(path, compiled.schedule).run({"x": x})["y"], expected["y"])


def test_a_cast_and_transposed_weight_is_evaluated_once(tmp_path: Path) -> None:
    path = _transposed_weight_model(tmp_path)
    compiled = hyperion.compile(path, mode="normal")
    assert compiled.ir.tensors["wt"].role is TensorRole.WEIGHT
    assert "w32" not in compiled.ir.tensors  # the chain left whole: only its last tensor is read
    np.testing.assert_array_equal(compiled.run({"x": _x(128)})["y"], reference_outputs(path, {"x": _x(128)})["y"])


def test_a_node_whose_output_exceeds_the_bound_stays_a_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fold_module, "EVALUATED_MAX_BYTES", 16 * 1024)  # the cast weight is 32 KiB
    path = _transposed_weight_model(tmp_path)
    compiled = hyperion.compile(path, memory_limit=200_000, mode="memory_opt")
    assert compiled.ir.tensors["wt"].role is not TensorRole.WEIGHT
    # Left as a node, a capped session computes it on every run instead of folding it.
    assert not compiled.schedule.segments[0].fold_constants
    reference = reference_outputs(path, {"x": _x(128)}, prepack_weights=compiled.schedule.packed_kernels)
    assert_outputs_equal(compiled.run({"x": _x(128)}), reference)


def test_the_cache_is_reused_and_the_users_file_untouched(tmp_path: Path, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fill_model(tmp_path)
    original = path.read_bytes()
    hyperion.compile(path, mode="normal")
    (entry,) = weights_folder(load_source(path, fold_constants=False).sha256).glob("folded-*.bin")
    before = entry.stat()

    def no_write(*args: object) -> None:
        raise AssertionError("the cache entry was written again")

    monkeypatch.setattr(fold_module, "write_atomic", no_write)
    again = hyperion.compile(path, mode="normal")
    after = entry.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert again.ir.tensors["w"].external.path == str(entry)
    assert path.read_bytes() == original
    assert len(list(tmp_path.iterdir())) == 2  # the model and the cache: nothing written beside the model


def test_a_changed_model_gets_a_new_entry(tmp_path: Path, cache: Path) -> None:
    first = hyperion.compile(_fill_model(tmp_path, 0.5), mode="normal").ir.tensors["w"].external
    second = hyperion.compile(_fill_model(tmp_path, 0.25), mode="normal").ir.tensors["w"].external
    assert Path(first.path).parent != Path(second.path).parent
    assert len(list((cache / "weights").iterdir())) == 2
    assert np.fromfile(second.path, np.float32, count=3, offset=second.offset).tolist() == [0.25] * 3


def test_a_cache_folder_that_cannot_be_created_is_a_typed_error(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HYPERION_CACHE_DIR", str(blocker / "cache"))  # refused even to root, unlike chmod
    with pytest.raises(hyperion.CacheError, match=str(blocker / "cache")) as refused:
        hyperion.compile(_fill_model(tmp_path), mode="normal")
    assert refused.value.exit_code == 20


def test_a_full_cache_folder_is_a_typed_error(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fold_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    with pytest.raises(hyperion.CacheError, match="131072 bytes.* 1000 free") as refused:
        hyperion.compile(_fill_model(tmp_path), mode="normal")
    assert str(cache) in str(refused.value)


def test_a_damaged_entry_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = _fill_model(tmp_path)
    entry = Path(hyperion.compile(path, mode="normal").ir.tensors["w"].external.path)
    entry.write_bytes(b"damaged")
    with pytest.raises(hyperion.CacheError, match=str(entry)):
        hyperion.compile(path, mode="normal")
    assert entry.read_bytes() == b"damaged"


def test_a_schedule_planned_before_folding_still_loads_and_runs(tmp_path: Path) -> None:
    path = _fill_model(tmp_path)
    unfolded = import_model(load_source(path, fold_constants=False))
    older = plan(unfolded, ExecutionMode.MEMORY_OPT, 150_000)
    assert older.tensors["w"].role is not TensorRole.WEIGHT
    loaded = hyperion.load(path, hyperion.Schedule.from_dict(json.loads(older.to_json())))
    reference = reference_outputs(path, {"x": _x(256)}, prepack_weights=older.prepack_weights)
    assert_outputs_equal(loaded.run({"x": _x(256)}), reference)
    folded = hyperion.compile(path, memory_limit=150_000, mode="memory_opt").schedule
    assert_outputs_equal(hyperion.load(path, folded).run({"x": _x(256)}), reference)


# A fill of 392 MB, compiled in a fresh process: written in chunks, it never is in memory whole.
FILL_ROWS, FILL_COLUMNS = 9800, 10000
COMPILE = """
from hyperion.tools.rss import peak_rss_bytes
import sys, hyperion
compiled = hyperion.compile(sys.argv[1], memory_limit="64MB", mode="memory_opt")
assert compiled.ir.tensors["w"].external is not None
print(peak_rss_bytes())
"""
BASELINE = """
from hyperion.tools.rss import peak_rss_bytes
import hyperion, onnxruntime
print(peak_rss_bytes())
"""


def test_a_large_fill_is_written_without_holding_it(tmp_path: Path) -> None:
    text = FILL.replace("256, 128", f"{FILL_ROWS}, {FILL_COLUMNS}").replace("VALUE", "0.5")
    text = text.replace("float[1, 256] x", f"float[1, {FILL_ROWS}] x").replace("float[1, 128] y",
                                                                              f"float[1, {FILL_COLUMNS}] y")
    path = tmp_path / "large_fill.onnx"
    onnx.save(onnx.parser.parse_model(text), str(path))
    fill_bytes = FILL_ROWS * FILL_COLUMNS * 4
    above_baseline = int(run_python(COMPILE, str(path))) - int(run_python(BASELINE))
    print(f"\ncompile of a {fill_bytes / 2**20:.0f} MiB fill: {above_baseline / 2**20:.1f} MiB above baseline")
    assert above_baseline < fill_bytes // 4


def test_an_in_memory_model_spills_its_embedded_weights_beside_the_computed_ones(cache: Path) -> None:
    """A ModelProto with a large embedded weight and a fill: the spill joins the computed
    weights in the model's cache folder, from which the streamed sessions read both."""
    w1 = np.random.default_rng(2).standard_normal((256, 256)).astype(np.float32)
    model = onnx.parser.parse_model(FILL.replace("VALUE", "0.5").replace("float[1, 256] x", "float[1, 256] x0")
                                    .replace("{\n", "{\n    x = MatMul (x0, w1)\n", 1))
    model.graph.initializer.append(numpy_helper.from_array(w1, "w1"))
    compiled = hyperion.compile(model, memory_limit=300_000, mode="memory_opt", weight_cache=0)
    assert compiled.ir.tensors["w"].role is TensorRole.WEIGHT
    x0 = {"x0": _x(256)}
    reference = reference_outputs(model.SerializeToString(), x0, prepack_weights=compiled.schedule.packed_kernels)
    assert_outputs_equal(compiled.run(x0), reference)
    folder = weights_folder(load_source(model, fold_constants=False).sha256)
    assert {p.name.split("-")[0].split(".")[0] for p in folder.iterdir()} == {"folded", "weights"}


def _deduplicated_bias_model(folder: Path) -> Path:
    """Two Convs whose second reads the first's bias through an Identity, as torch's exporter
    writes a deduplicated weight; weights in an external-data file."""
    rng = np.random.default_rng(4)
    weights = [numpy_helper.from_array((rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32), name)
               for name in ("w1", "w2")]
    weights.append(numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Identity", ["b1"], ["b2"], name="dedup"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2")],
        "dedup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 16, 16])], weights)
    path = folder / "dedup.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location="dedup.onnx.data", size_threshold=0)
    return path


def test_an_identity_of_a_weight_is_that_weight_even_with_external_data(tmp_path: Path, cache: Path) -> None:
    """Its output refers to the weight's own bytes, and the segment that reads it holds a
    constant: its relaid Conv runs in onnxruntime's NCHWc layout (as a segment input it did not)."""
    path = _deduplicated_bias_model(tmp_path)
    compiled = hyperion.compile(path, memory_limit="1.2MB", mode="memory_opt", max_segment_steps=1,
                                weight_cache=0)
    assert "Identity" not in [step.op_type for step in compiled.schedule.steps]
    alias, original = compiled.ir.tensors["b2"], compiled.ir.tensors["b1"]
    assert alias.role is TensorRole.WEIGHT and alias.external == original.external is not None
    second = next(s for s in compiled.schedule.segments if "b2" in s.weights)
    assert second.relaid and "b2" not in second.inputs
    x = np.random.default_rng(5).standard_normal((1, 64, 16, 16)).astype(np.float32)
    got = compiled.run({"x": x})
    optimized = [onnx.load(p, load_external_data=False) for p in cache.glob("relaid/*/segment.onnx")]
    convolutions = [(n.domain, n.op_type) for m in optimized for n in m.graph.node if n.op_type.endswith("Conv")]
    assert convolutions == [("com.microsoft.nchwc", "Conv")] * 2
    np.testing.assert_allclose(got["y"], reference_outputs(path, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(hyperion.load(path, compiled.schedule).run({"x": x})["y"], got["y"])
    # A schedule planned while the Identity was a node still runs it as a node.
    older = plan(import_model(load_source(path, fold_constants=False)), ExecutionMode.NORMAL, None)
    assert "Identity" in [step.op_type for step in older.steps]
    np.testing.assert_array_equal(hyperion.load(path, older).run({"x": x})["y"],
                                  reference_outputs(path, {"x": x})["y"])
