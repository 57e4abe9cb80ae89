"""Bad input and hostile models (issue 12): every case is a typed, one-line error naming
the culprit; nothing outside the model's folder is read; nothing the user gave is
replaced; nothing half-written is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hyperion
from hyperion.errors import (
    FeedError,
    HyperionError,
    ModelLoadError,
    OptionError,
    OutputError,
    ScheduleError,
    ShapeError,
    UnsafeModelError,
)
from hyperion.files import write_atomic
from hyperion.schedule import Schedule
from hyperion.tools.cli import main
from tests.conftest import fixture_path

SECRET = np.arange(4, dtype=np.float32).tobytes() + b"SECRET-BYTES"
X = {"x": np.ones(4, np.float32)}


def _ext_model(folder: Path, location: str, *, consumed: bool = False, extra: tuple = ()) -> Path:
    """y = Relu(x) (+ w when ``consumed``); the weight w is external data at ``location``
    and a graph output, so memory_opt reads it with numpy, not through a session."""
    folder.mkdir(parents=True, exist_ok=True)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16"), *extra):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Add", ["r", "w"] if consumed else ["r", "r"], ["y"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("y", "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], outputs, [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return path


# -- containment ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "dotdot-inside"])
@pytest.mark.parametrize("mode", ["memory_opt", "normal"])
def test_external_data_outside_the_models_folder_is_refused_at_import(tmp_path: Path, secret: Path, kind: str,
                                                                      mode: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.bin",
                "dotdot-inside": "sub/../../secret.bin"}[kind]
    if kind == "symlink":
        (folder / "link.bin").symlink_to(secret)
    path = _ext_model(folder, location)
    with pytest.raises(UnsafeModelError) as caught:
        hyperion.compile(path, memory_limit="1MB" if mode == "memory_opt" else None, mode=mode).run(X)
    assert caught.value.tensor == "w" and caught.value.location == location
    assert "'w'" in str(caught.value) and repr(location) in str(caught.value)


def test_a_symlink_inside_the_folder_is_followed(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "real.bin").write_bytes(SECRET)
    (folder / "link.bin").symlink_to(folder / "real.bin")
    outputs = hyperion.compile(_ext_model(folder, "link.bin"), memory_limit="1MB", mode="memory_opt").run(X)
    np.testing.assert_array_equal(outputs["w"], np.arange(4, dtype=np.float32))


def test_memory_opt_reads_a_weight_output_only_where_the_model_says_after_the_check(tmp_path: Path,
                                                                                   secret: Path) -> None:
    folder = tmp_path / "model"
    (folder / "data.bin").parent.mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"\0" * 16)
    proto = onnx.load(_ext_model(folder, "data.bin"), load_external_data=False)
    cm = hyperion.compile(proto, memory_limit="1MB", mode="memory_opt", base_dir=folder)
    np.testing.assert_array_equal(cm.run(X)["w"], np.zeros(4, np.float32))
    proto.graph.initializer[0].external_data[0].value = "../secret.bin"   # the caller's proto, edited
    with pytest.raises(UnsafeModelError):
        cm.run(X)


def test_run_output_dir_never_receives_bytes_from_outside(tmp_path: Path, secret: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    path = _ext_model(tmp_path / "model", "../secret.bin")
    out = tmp_path / "out"
    code = main(["run", str(path), "--memory-limit", "1MB", "--mode", "memory_opt", "--seed", "0",
                 "--output-dir", str(out)])
    assert code == UnsafeModelError.exit_code == 5
    assert not out.exists() or not any(out.iterdir())
    assert "../secret.bin" in capsys.readouterr().err


def test_load_refuses_a_data_file_replaced_by_a_symlink_out(tmp_path: Path, secret: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"\0" * 16)
    path = _ext_model(folder, "data.bin")
    saved = hyperion.compile(path, memory_limit="1MB", mode="memory_opt").schedule.save(tmp_path / "s.json")
    (folder / "data.bin").unlink()
    (folder / "data.bin").symlink_to(secret)
    with pytest.raises(UnsafeModelError):
        hyperion.load(path, saved).run(X)


def test_load_refuses_a_schedule_pointing_a_weight_elsewhere(tmp_path: Path, secret: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"\0" * 16)
    path = _ext_model(folder, "data.bin")
    data = hyperion.compile(path, memory_limit="1MB", mode="memory_opt").schedule.to_dict()
    data["tensors"]["w"]["external"]["path"] = str(secret)
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="tensors/w/external"):
        hyperion.load(path, tmp_path / "s.json").run(X)


def test_in_memory_models_with_external_data_need_a_base_dir(tmp_path: Path) -> None:
    model = fixture_path("external_data")
    data = model.read_bytes()
    with pytest.raises(ModelLoadError, match="base_dir"):
        hyperion.compile(data)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)}
    want = hyperion.compile(model, prepack_weights=False).run(feeds)   # the capped plan's kernels: unpacked
    for given in (data, onnx.load(model, load_external_data=False)):   # sessions read from base_dir
        got = hyperion.compile(given, memory_limit="700KB", mode="memory_opt", base_dir=model.parent).run(feeds)
        np.testing.assert_array_equal(got["y"], want["y"])
    with pytest.raises(OptionError, match="base_dir"):
        hyperion.compile(model, base_dir=tmp_path)
    hostile = onnx.load(_ext_model(tmp_path / "h", "../secret.bin"), load_external_data=False)
    with pytest.raises(UnsafeModelError):
        hyperion.compile(hostile, base_dir=tmp_path / "h")


# -- never overwrite what the user gave; atomic writes ------------------------------------------
def test_compile_refuses_to_write_the_schedule_over_the_model(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(fixture_path("mlp").read_bytes())
    before = model.read_bytes()
    assert main(["compile", str(model), "-o", str(model)]) == OutputError.exit_code
    assert model.read_bytes() == before
    with pytest.raises(OutputError, match="the model"):
        hyperion.compile(model).schedule.save(model)
    assert model.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]   # no temporary file left


def test_schedule_save_refuses_the_models_data_file(tmp_path: Path) -> None:
    data = fixture_path("external_data").with_name("external_data.onnx.data")
    with pytest.raises(OutputError, match="external data"):
        hyperion.compile(fixture_path("external_data")).schedule.save(data)


def test_run_output_dir_refuses_an_input_file_and_export_the_schedule_read(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    x = np.ones((1, 64), np.float32)
    np.save(out / "y.npy", x)    # the model's output is y: y.npy in --output-dir would replace this input
    code = main(["run", str(fixture_path("mlp")), "--input", f"x={out / 'y.npy'}", "--output-dir", str(out)])
    assert code == OutputError.exit_code
    np.testing.assert_array_equal(np.load(out / "y.npy"), x)
    schedule = tmp_path / "s.json"
    assert main(["compile", str(fixture_path("mlp")), "-o", str(schedule)]) == 0
    before = schedule.read_bytes()
    assert main(["export", str(schedule), "--format", "dot", "-o", str(schedule)]) == OutputError.exit_code
    assert main(["plot", str(schedule), "-o", str(tmp_path / "s.json.png")]) == 0
    assert schedule.read_bytes() == before


def test_writes_are_atomic_and_clean_up(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def half_then_fail(handle) -> None:
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="a.bin"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    with pytest.raises(OutputError, match="is a folder"):
        hyperion.compile(fixture_path("mlp")).schedule.save(tmp_path)
    with pytest.raises(OutputError, match="cannot write"):
        hyperion.compile(fixture_path("mlp")).schedule.save(target / "under-a-file.json")


def test_run_output_dir_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(file, arr, **kwargs) -> None:
        file.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", failing_save)
    out = tmp_path / "out"
    assert main(["run", str(fixture_path("mlp")), "--seed", "0", "--output-dir", str(out)]) == OutputError.exit_code
    assert not any(out.iterdir())


# -- typed errors at the boundary ----------------------------------------------------------
def _mutated_schedule(tmp_path: Path, edit) -> Path:
    cm = hyperion.compile(fixture_path("mlp"), max_segment_steps=1, whole_model_shortcut=False)
    data = cm.schedule.to_dict()
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _drop_activation(data: dict) -> None:
    del data["tensors"][next(n for n, t in data["tensors"].items() if t["role"] == "activation")]


@pytest.mark.parametrize(("edit", "where"), [
    (lambda d: d["steps"][0].update(node="nope"), "steps/0"),
    (lambda d: d["steps"][1].update(op_type="Conv"), "steps/1"),
    (lambda d: d["steps"][0].update(segment=7), "steps/0"),
    (lambda d: d["segments"][-1].update(last_step=99), "segments/"),
    (lambda d: d["segments"].pop(), "segment"),
    (_drop_activation, "tensor"),
    (lambda d: d["graph_outputs"].append("fc1_out"), "graph_outputs"),
    (lambda d: d["input_shapes"].pop("x"), "input_shapes"),        # found by tests/test_fuzz.py
    (lambda d: d["graph_inputs"].pop(), "graph_inputs"),
    (lambda d: d["tensors"]["x"].update(producer="ghost"), "tensors/x"),
    (lambda d: d["tensors"]["y"]["value_type"].update(elem_type="NOPE"), "tensors/y/value_type"),
    (lambda d: d["edges"].append({"src": "fc1", "dst": "ghost", "tensor": "y", "kind": "sequential"}), "edges"),
])
def test_an_edited_schedule_of_the_right_model_is_refused_on_load(tmp_path: Path, edit, where: str) -> None:
    path = _mutated_schedule(tmp_path, edit)
    with pytest.raises(ScheduleError, match=where):
        hyperion.load(fixture_path("mlp"), path).run({"x": np.ones((1, 64), np.float32)})


def _cycle_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second"),
         helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _duplicate_producer_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu"), helper.make_node("Neg", ["x"], ["y"], name="neg")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _huge_weight_model(path: Path) -> Path:
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 30, 1 << 30])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [w])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _short_weight_model(path: Path) -> Path:
    """Found by tests/test_fuzz.py: a weight holding fewer bytes than its dims need."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3], raw_data=b"\0" * 4)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [w])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _not_utf8(data: bytes) -> bytes:
    """Found by tests/test_fuzz.py: protobuf hands back bytes for a string field that is not UTF-8."""
    at = data.find(b"fc1")
    return data[:at] + b"\xe8" + data[at + 1:]


def _unknown_type_model(path: Path) -> Path:
    """Found by tests/test_fuzz.py: an element type number ONNX does not define."""
    model = onnx.load(_short_weight_model(path))
    model.graph.initializer[0].data_type = 99
    path.write_bytes(model.SerializeToString())
    return path


def _empty_string_weight_model(path: Path) -> Path:
    """Found by tests/test_fuzz.py: a scalar string weight with no string, also a graph output."""
    w = TensorProto(name="w", data_type=TensorProto.STRING, dims=[])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
                               helper.make_tensor_value_info("w", TensorProto.STRING, [])], [w])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _unknown_input_type_model(path: Path) -> Path:
    """Found by the atheris run of make fuzz: an input declared with element type 145149."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 145149, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _huge_input_model(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 30, 1 << 30, 1 << 30])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1 << 30, 1 << 30, 1 << 30])])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _deep_json(path: Path) -> Path:
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def _long_int_json(path: Path) -> Path:
    path.write_text('{"format": "hyperion.schedule", "version": ' + "9" * 5000 + "}")
    return path


CASES = {
    "zero-filled large file": (lambda t: _write(t / "z.onnx", b"\0" * (2 << 20)), {}, ModelLoadError, "z.onnx"),
    "truncated large file": (lambda t: _write(t / "t.onnx", b"\x3a\xff\xff\xff\x0f" + b"\1" * (1 << 20)), {},
                             ModelLoadError, "t.onnx"),
    "offset not an integer": (lambda t: _ext_model(t / "m", "d.bin", extra=(("offset", "abc"),)), {},
                              ModelLoadError, "offset 'abc'"),
    "length not an integer": (lambda t: _ext_model(t / "m", "d.bin", extra=(("length", "1e3"),)), {},
                              ModelLoadError, "length '1e3'"),
    "negative offset": (lambda t: _ext_model(t / "m", "d.bin", extra=(("offset", "-4"),)), {},
                        ModelLoadError, "offset '-4'"),
    "size string overflows": (lambda t: fixture_path("mlp"), {"memory_limit": "9" * 400 + "TB"}, OptionError,
                              "memory_limit"),
    "size beyond any machine": (lambda t: fixture_path("mlp"), {"memory_limit": "9" * 20 + "TB"}, OptionError,
                                "memory_limit"),
    "input_shapes strings": (lambda t: fixture_path("dynamic_dims"), {"input_shapes": {"input_ids": ["a", 5]}},
                             OptionError, "input_ids"),
    "input_shapes floats": (lambda t: fixture_path("dynamic_dims"), {"input_shapes": {"input_ids": [2.5, 5]}},
                            OptionError, "2.5"),
    "input_shapes negative": (lambda t: fixture_path("dynamic_dims"), {"input_shapes": {"input_ids": [-2, 5]}},
                              OptionError, "-2"),
    "input_shapes not a dict": (lambda t: fixture_path("dynamic_dims"), {"input_shapes": [[2, 5]]}, OptionError,
                                "input_shapes"),
    "input_shapes absurd": (lambda t: fixture_path("dynamic_dims"), {"input_shapes": {"input_ids": [1 << 40] * 2}},
                            OptionError, "input_ids"),
    "streaming a zero batch": (lambda t: fixture_path("dynamic_dims"),
                               {"mode": "streaming", "memory_limit": "10MB", "input_shapes": {"input_ids": [0, 5]}},
                               ShapeError, "batch"),
    "cycle": (lambda t: _cycle_model(t / "cyc.onnx"), {}, ModelLoadError, "cyc.onnx"),
    "duplicate producers": (lambda t: _duplicate_producer_model(t / "dup.onnx"), {}, ModelLoadError, "'neg'"),
    "absurd weight dims": (lambda t: _huge_weight_model(t / "w.onnx"), {}, ModelLoadError, "'w'"),
    "a name that is not UTF-8": (lambda t: _not_utf8(fixture_path("mlp").read_bytes()), {}, ModelLoadError, "UTF-8"),
    "element type ONNX does not define": (lambda t: _unknown_type_model(t / "u.onnx"), {}, ModelLoadError, "'w'"),
    "string weight without its strings": (lambda t: _empty_string_weight_model(t / "e.onnx"), {}, ModelLoadError,
                                          "'w'"),
    "input of an element type ONNX does not define": (lambda t: _unknown_input_type_model(t / "x.onnx"), {},
                                                      ModelLoadError, "'x'"),
    "weight shorter than its dims": (lambda t: _short_weight_model(t / "s.onnx"), {}, ModelLoadError, "'w'"),
    "absurd input dims": (lambda t: _huge_input_model(t / "i.onnx"), {}, ShapeError, "'x'"),
    "model path is a folder": (lambda t: t, {}, ModelLoadError, "folder"),
    "model of another type": (lambda t: 42, {}, OptionError, "int"),
    "max_segment_steps zero": (lambda t: fixture_path("mlp"), {"max_segment_steps": 0}, OptionError,
                               "max_segment_steps"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_compile_refuses_bad_input_with_a_typed_error_naming_it(tmp_path: Path, case: str) -> None:
    make, kwargs, error, needle = CASES[case]
    model = make(tmp_path)
    if isinstance(model, Path) and model.parent.is_relative_to(tmp_path):   # the data file of _ext_model
        (model.parent / "d.bin").write_bytes(b"\0" * 64)
    with pytest.raises(error) as caught:
        hyperion.compile(model, **kwargs)
    assert needle in str(caught.value)


@pytest.mark.parametrize("feeds", [None, [np.ones((1, 64), np.float32)], {1: np.ones((1, 64), np.float32)},
                                   {"x": [[1.0], [1.0, 2.0]]}, {"x": object()}, "x"])
@pytest.mark.parametrize("whole_model", [True, False])
def test_run_refuses_feeds_that_are_not_a_dict_of_arrays(feeds, whole_model: bool) -> None:
    cm = hyperion.compile(fixture_path("mlp"), max_segment_steps=None if whole_model else 1)
    with pytest.raises(FeedError):
        cm.run(feeds)


@pytest.mark.parametrize(("make", "needle"), [
    (_deep_json, "nested deeper"),
    (_long_int_json, "invalid JSON"),
    (lambda p: p.parent, "is a folder"),
    (lambda p: _write(p, b"\xff\xfe{}"), "invalid JSON"),
])
def test_bad_schedule_files_are_schedule_errors(tmp_path: Path, make, needle: str) -> None:
    with pytest.raises(ScheduleError, match=needle):
        hyperion.load(fixture_path("mlp"), make(tmp_path / "s.json"))


def test_schedule_files_are_bounded_in_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = hyperion.compile(fixture_path("mlp")).schedule.save(tmp_path / "s.json")
    monkeypatch.setattr("hyperion.schedule.MAX_SCHEDULE_BYTES", 1000)
    with pytest.raises(ScheduleError, match="larger than 1000 bytes"):
        Schedule.load(saved)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_schedule_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ScheduleError, match="not a regular file"):
        Schedule.load(tmp_path / "fifo.json")


# -- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["plot", "{schedule}", "-o", "{tmp}/x.xyz"],
    ["run", "{mlp}", "--seed", "-1"],
    ["bench", "{mlp}", "--repeats", "0"],
    ["bench", "{mlp}", "--repeats", "many"],
    ["compile", "{mlp}", "--memory-limit", "9" * 400 + "TB"],
])
def test_bad_arguments_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str]) -> None:
    schedule = hyperion.compile(fixture_path("mlp")).schedule.save(tmp_path / "s.json")
    args = [a.format(schedule=schedule, tmp=tmp_path, mlp=fixture_path("mlp")) for a in args]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "x.xyz").exists()


def _nan_model(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def test_check_matches_identical_outputs_with_nan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "x.npy", np.array([-1, 0, 4, np.inf], np.float32))
    assert main(["run", str(_nan_model(tmp_path / "sqrt.onnx")), "--input", f"x={tmp_path / 'x.npy'}",
                 "--check"]) == 0
    assert "outputs match plain onnxruntime (max abs difference 0)" in capsys.readouterr().out


def test_random_inputs_beyond_the_machines_memory_are_refused(capsys: pytest.CaptureFixture) -> None:
    code = main(["run", str(fixture_path("dynamic_dims")), "--input-shape", "input_ids=1000000x1000000"])
    assert code == OptionError.exit_code
    assert "memory" in capsys.readouterr().err


@pytest.mark.parametrize(("error", "code"), [(OptionError, 2), (ModelLoadError, 4), (UnsafeModelError, 5),
                                             (ShapeError, 6), (FeedError, 8), (ScheduleError, 10),
                                             (OutputError, 15), (HyperionError, 3)])
def test_every_error_class_has_its_own_exit_code(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                error: type[HyperionError], code: int) -> None:
    def fail(args) -> int:
        raise error("first line\nsecond line")

    monkeypatch.setitem(__import__("hyperion.tools.cli").tools.cli.COMMANDS, "demo", fail)
    assert main(["demo"]) == code
    assert capsys.readouterr().err == "hyperion: error: first line second line\n"


def test_an_internal_error_is_one_line_and_exit_70(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    def fail(args) -> int:
        raise KeyError("boom")

    monkeypatch.setitem(__import__("hyperion.tools.cli").tools.cli.COMMANDS, "demo", fail)
    assert main(["demo"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", "demo"])


def test_random_inputs_of_an_impossible_shape_are_refused() -> None:
    """Found by tests/test_fuzz.py: zero elements, but a shape numpy cannot index."""
    from hyperion.tools.feeds import random_feeds

    graph = hyperion.compile(fixture_path("dynamic_dims")).base_ir
    with pytest.raises(OptionError, match="input_ids"):
        random_feeds(graph, {"input_ids": [0, 1 << 62]}, 0)


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path: Path) -> None:
    from hyperion.files import write_atomic

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = write_atomic(tmp_path / "atomic.txt", "x")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


LONG_VECTOR = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[10000000] ids) => (float[10000000] y) {
    y = Cast <to = 1> (ids)
}"""


def test_a_long_integer_vector_does_not_exhaust_memory_at_import() -> None:
    """onnx's data propagation would make the int64[10**7] a shape of 10**7 dims (1.4 GB at
    import); compiling in a fresh process must stay far below that, and still size ``y``."""
    script = (
        "import onnx, hyperion\n"
        "from hyperion.tools.rss import peak_rss_bytes\n"
        "before = peak_rss_bytes()\n"
        f"cm = hyperion.compile(onnx.parser.parse_model({LONG_VECTOR!r}))\n"
        "print(cm.schedule.tensors['y'].shape, (peak_rss_bytes() - before) >> 20)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    shape, grown_mib = result.stdout.split(")")
    assert shape == "(10000000," and int(grown_mib) < 200
