"""Fuzzing (issue 12): hostile model bytes, random ONNX graphs and edited schedules.

Whatever the input, only a :class:`HyperionError` may come out; no example may run
longer than ``TIMEOUT_S``; no byte outside the work folder may be read into an output
(``outside/secret.bin`` sits beside every model, and hostile locations point at it) and
no file outside the work folder may change.

``make test`` runs a short, derandomized pass (``HYPERION_FUZZ_EXAMPLES``, default
12 per strategy); ``make fuzz`` a long one with fresh randomness (see Makefile).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import hyperion
from hyperion.errors import HyperionError
from hyperion.tools.feeds import input_shapes_of, random_feeds
from tests.conftest import fixture_path

EXAMPLES = int(os.environ.get("HYPERION_FUZZ_EXAMPLES", "12"))
LONG = "HYPERION_FUZZ_EXAMPLES" in os.environ
TIMEOUT_S = 60
SECRET = b"\x00\x00\x80\x3fSECRET-OUTSIDE-THE-MODEL-FOLDER" * 8
MAX_FEED_BYTES = 1 << 24     # random feeds larger than this are not generated (the model is still compiled)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, database=None,
                suppress_health_check=list(HealthCheck))
SMALL_FIXTURES = ("mlp", "resnet_block", "control_flow", "old_opset", "dynamic_dims", "external_data",
                  "transformer_block")
MODES = ("normal", "memory_opt", "streaming", "adaptive")
LIMITS = (None, "64KB", "300KB", "4MB")


class ExampleTimeout(Exception):
    """An example ran longer than TIMEOUT_S: a hang."""


@contextlib.contextmanager
def work_folder() -> Iterator[Path]:
    """A fresh folder with ``model/`` (where models go) and ``outside/secret.bin`` beside it;
    Hyperion's cache goes inside it. Fails the example if the secret changed or the repo's
    fixtures did, or if the example outlived TIMEOUT_S."""
    fixtures = {p: p.stat().st_mtime_ns for p in fixture_path("mlp").parent.glob("*.onnx*")}
    root = Path(tempfile.mkdtemp(prefix="hyperion-fuzz-"))
    (root / "model").mkdir()
    (root / "outside").mkdir()
    (root / "outside" / "secret.bin").write_bytes(SECRET)
    saved_cache, saved_cwd = os.environ.get("HYPERION_CACHE_DIR"), Path.cwd()
    os.environ["HYPERION_CACHE_DIR"] = str(root / "cache")
    os.chdir(root / "model")

    def expire(signum, frame) -> None:
        raise ExampleTimeout(f"example ran longer than {TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT_S)
    try:
        yield root / "model"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(saved_cwd)
        if saved_cache is None:
            os.environ.pop("HYPERION_CACHE_DIR", None)
        else:
            os.environ["HYPERION_CACHE_DIR"] = saved_cache
        assert (root / "outside" / "secret.bin").read_bytes() == SECRET
        assert sorted((root / "outside").iterdir()) == [root / "outside" / "secret.bin"]
        assert {p: p.stat().st_mtime_ns for p in fixtures} == fixtures
        shutil.rmtree(root, ignore_errors=True)


def only_typed_errors(action: Callable[[], object]) -> object:
    """Run ``action``; a HyperionError is an answer, anything else a defect."""
    try:
        return action()
    except HyperionError:
        return None


def compile_and_run(model, mode: str, limit: str | None, **kwargs) -> None:
    def go() -> None:
        cm = hyperion.compile(model, memory_limit=limit, mode=mode, **kwargs)
        shapes = input_shapes_of(cm.base_ir)
        size = sum(int(np.prod(s, dtype=np.int64)) * 8 for s in shapes.values())
        if size > MAX_FEED_BYTES or cm.schedule.peak_bytes > (64 << 20):
            return
        outputs = cm.run(random_feeds(cm.base_ir, shapes, 0))
        for value in outputs.values():
            if isinstance(value, np.ndarray) and value.dtype != object:
                assert b"SECRET-OUTSIDE" not in value.tobytes(), "bytes from outside the model's folder"

    only_typed_errors(go)


# -- strategy 1: mutated fixture bytes -------------------------------------------------------------
@st.composite
def mutated_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(SMALL_FIXTURES))
    data = bytearray(fixture_path(name).read_bytes())
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(("flip", "truncate", "insert", "zero", "duplicate", "splice-secret")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "zero":
            end = at + draw(st.integers(1, 64))
            data[at:end] = bytes(len(data[at:end]))
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 256))]
        else:  # point a location-sized string at the secret
            data[at:at] = b"../outside/secret.bin"
    return name, bytes(data)


@FUZZ
@given(mutated_bytes(), st.sampled_from(MODES), st.sampled_from(LIMITS), st.booleans())
def test_mutated_model_bytes(case: tuple[str, bytes], mode: str, limit: str | None, as_bytes: bool) -> None:
    name, data = case
    with work_folder() as folder:
        if name == "external_data":
            shutil.copy(fixture_path(name).with_name("external_data.onnx.data"), folder)
        path = folder / "m.onnx"
        path.write_bytes(data)
        model = data if as_bytes else path
        compile_and_run(model, mode, limit, **({"base_dir": folder} if as_bytes else {}))


# -- strategy 2: random ONNX graphs ----------------------------------------------------------------
DTYPES = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.BOOL, TensorProto.FLOAT16,
          TensorProto.INT8, TensorProto.STRING, TensorProto.UNDEFINED, 99)
LOCATIONS = st.one_of(st.sampled_from(["data.bin", "../outside/secret.bin", "sub/../../outside/secret.bin",
                                       "link.bin", "", "missing.bin", ".", "data.bin\0x", "C:\\x.bin",
                                       "\\\\server\\share", "/etc/hostname"]),
                      st.text(max_size=12))
NUMBERS = st.one_of(st.integers(-5, 1 << 70).map(str), st.sampled_from(["", "0", "16", "abc", "1e3", " 4", "٣"]))
DIMS = st.one_of(st.integers(-2, 6), st.sampled_from([1 << 31, 1 << 62]), st.sampled_from(["batch", "seq", ""]))


@st.composite
def external_weight(draw: st.DrawFn, name: str) -> TensorProto:
    dims = draw(st.lists(st.integers(-1, 6) | st.just(1 << 40), max_size=3))
    tensor = TensorProto(name=name, data_type=draw(st.sampled_from(DTYPES)), dims=dims)
    if draw(st.booleans()):
        tensor.data_location = TensorProto.EXTERNAL
        fields = {"location": draw(LOCATIONS)}
        for key in ("offset", "length"):
            if draw(st.booleans()):
                fields[key] = draw(NUMBERS)
        for key, value in fields.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    else:
        tensor.raw_data = draw(st.binary(max_size=64))
    return tensor


ATTRIBUTES = st.dictionaries(
    st.sampled_from(["axis", "perm", "keepdims", "to", "alpha", "axes", "kernel_shape", "strides", "pads", "mode",
                     "transB", "value", "epsilon"]),
    st.one_of(st.integers(-3, 8), st.lists(st.integers(-3, 4), max_size=4), st.floats(allow_nan=True),
              st.text(max_size=4)), max_size=2)
OPS = ("Relu", "Add", "Mul", "MatMul", "Transpose", "Reshape", "Concat", "Softmax", "Cast", "Gather", "ReduceSum",
       "Identity", "Gemm", "Conv", "Sqrt", "Where", "Expand", "Shape", "Slice", "NoSuchOp", "Constant")


@st.composite
def random_graph(draw: st.DrawFn) -> tuple[bytes, bool]:
    inputs = [helper.make_tensor_value_info(f"in{i}", draw(st.sampled_from(DTYPES[:4])),
                                            draw(st.lists(DIMS, max_size=3)))
              for i in range(draw(st.integers(1, 2)))]
    names = [i.name for i in inputs]
    weights = [draw(external_weight(f"w{i}")) for i in range(draw(st.integers(0, 2)))]
    names += [w.name for w in weights]
    nodes = []
    for index in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(OPS))
        arity = draw(st.integers(0, 3))
        ins = [draw(st.sampled_from(names + ["", "ghost"])) for _ in range(arity)]
        outs = [draw(st.sampled_from([f"t{index}", f"t{index}", names[-1]]))] if draw(st.integers(0, 9)) else []
        node = helper.make_node(op, ins, outs, name=draw(st.sampled_from([f"n{index}", "", "dup"])))
        for key, value in draw(ATTRIBUTES).items():
            with contextlib.suppress(Exception):  # make_attribute refuses some mixes: leave them out
                node.attribute.append(helper.make_attribute(key, value))
        nodes.append(node)
        names += outs
    outputs = [helper.make_tensor_value_info(n, draw(st.sampled_from(DTYPES[:4])), None)
               for n in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))]
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, weights)
    opset = draw(st.sampled_from([7, 11, 13, 17, 21]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=draw(st.sampled_from([3, 7, 8, 10])))
    return model.SerializeToString(), draw(st.booleans())


@FUZZ
@given(random_graph(), st.sampled_from(MODES), st.sampled_from(LIMITS))
def test_random_graphs(case: tuple[bytes, bool], mode: str, limit: str | None) -> None:
    data, link = case
    with work_folder() as folder:
        (folder / "data.bin").write_bytes(bytes(range(256)) * 4)
        (folder / "sub").mkdir()
        if link:
            (folder / "link.bin").symlink_to(folder.parent / "outside" / "secret.bin")
        else:
            (folder / "link.bin").symlink_to(folder / "data.bin")
        (folder / "m.onnx").write_bytes(data)
        if os.environ.get("HYPERION_FUZZ_LAST"):  # to find an input that kills the process (a crash in a library)
            Path(os.environ["HYPERION_FUZZ_LAST"]).write_bytes(data)
        compile_and_run(folder / "m.onnx", mode, limit)


# -- strategy 3: edited schedules ------------------------------------------------------------------
_SCHEDULES: dict[str, dict] = {}


def _schedule_of(name: str) -> dict:
    if name not in _SCHEDULES:
        kwargs = ({"memory_limit": "700KB", "mode": "memory_opt"} if name == "external_data"
                  else {"max_segment_steps": 1, "whole_model_shortcut": False})
        _SCHEDULES[name] = hyperion.compile(fixture_path(name), **kwargs).schedule.to_dict()
    return json.loads(json.dumps(_SCHEDULES[name]))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 1 << 64) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=8)


def _paths(value, prefix=()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@st.composite
def edited_schedule(draw: st.DrawFn) -> tuple[str, dict]:
    name = draw(st.sampled_from(("mlp", "external_data", "resnet_block")))
    data = _schedule_of(name)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)[1:]))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(("replace", "delete", "swap-name", "number")))
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "swap-name":
            names = list(data.get("tensors", {})) + [s.get("node") for s in data.get("steps", []) if
                                                    isinstance(s, dict)] + ["ghost", "../outside/secret.bin"]
            parent[path[-1]] = draw(st.sampled_from(names))
        elif kind == "number":
            parent[path[-1]] = draw(st.sampled_from([-1, 0, 1, 2, 99, 1 << 62]))
        else:
            parent[path[-1]] = draw(JSON)
        if not isinstance(data, dict):
            break
    return name, data


@FUZZ
@given(edited_schedule())
def test_edited_schedules(case: tuple[str, dict]) -> None:
    name, data = case
    with work_folder() as folder:
        path = folder / "s.json"
        path.write_text(json.dumps(data))
        feeds = {"external_data": {"x": np.ones((1, 256), np.float32)}, "mlp": {"x": np.ones((1, 64), np.float32)},
                 "resnet_block": {"x": np.ones((1, 8, 16, 16), np.float32)}}[name]

        def go() -> None:
            outputs = hyperion.load(fixture_path(name), path).run(feeds)
            for value in outputs.values():
                assert b"SECRET-OUTSIDE" not in np.asarray(value).tobytes()

        only_typed_errors(go)


# -- strategy 4: arguments at the boundary --------------------------------------------------------
ANYTHING = st.one_of(JSON, st.binary(max_size=8), st.just(object()), st.lists(st.floats(), max_size=3))


@FUZZ
@given(memory_limit=ANYTHING | st.text(max_size=12), input_shapes=ANYTHING | st.dictionaries(
    st.sampled_from(["input_ids", "x", 1]), ANYTHING | st.lists(DIMS | st.floats(), max_size=3)),
    mode=ANYTHING | st.sampled_from(MODES), feeds=ANYTHING | st.dictionaries(st.sampled_from(["input_ids", "x"]),
                                                                              ANYTHING))
def test_api_arguments(memory_limit, input_shapes, mode, feeds) -> None:
    with work_folder():
        only_typed_errors(lambda: hyperion.compile(fixture_path("dynamic_dims"), memory_limit=memory_limit,
                                                   mode=mode, input_shapes=input_shapes))
        cm = hyperion.compile(fixture_path("dynamic_dims"))
        only_typed_errors(lambda: cm.run(feeds))


@pytest.mark.parametrize("location", ["../outside/secret.bin", "link.bin"])
def test_the_work_folder_guard_sees_a_leak(location: str) -> None:
    """The harness itself: reading the secret into an output would be caught."""
    with pytest.raises(AssertionError, match="outside"), work_folder() as folder:
        (folder / "link.bin").symlink_to(folder.parent / "outside" / "secret.bin")
        value = np.frombuffer((folder / location).read_bytes()[:64], np.uint8)
        assert b"SECRET-OUTSIDE" not in value.tobytes(), "bytes from outside the model's folder"
