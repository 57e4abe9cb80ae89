"""Shared test helpers: fixture models, plain-onnxruntime references, output checks."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the fixtures package lives at the repo root

from fixtures import FIXTURE_NAMES, example_feeds, fixture_path  # noqa: E402
from hyperion.runtime import session_options  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _cache_of_the_session(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hyperion's cache (relaid segments, folded weights) in the session's temporary folder:
    tests write gigabytes of optimizer files for models that exist only in their run, which
    the user's ``~/.cache/hyperion`` must not keep. Subprocesses inherit it."""
    os.environ["HYPERION_CACHE_DIR"] = str(tmp_path_factory.mktemp("hyperion-cache"))


# float32 outputs must match plain onnxruntime to these tolerances; integers exactly.
RTOL, ATOL = 1e-5, 1e-6

# x / mean(x * x) over axes computed at run time: mean keeps both dims as [1, 1], a shape
# only a guess could make [3, 4] (onnxruntime's symbolic inference merged it so once).
RUNTIME_AXES_MEAN = '''<ir_version: 8, opset_import: ["" : 18]>
g (float[3,4] x) => (float[3,4] y) {
    shape = Shape (x)
    rank = Size (shape)
    zero = Constant <value = int64 {0}> ()
    one = Constant <value = int64 {1}> ()
    axes = Range (zero, rank, one)
    squared = Mul (x, x)
    mean = ReduceMean (squared, axes)
    y = Div (x, mean)
}'''


def reference_outputs(model: str | Path | bytes, feeds: Mapping[str, np.ndarray],
                      prepack_weights: bool = True) -> dict[str, np.ndarray]:
    """Outputs of plain onnxruntime on the same model and feeds (with the same kernels as
    Hyperion compiled with ``prepack_weights``)."""
    source = str(model) if isinstance(model, Path) else model
    options = session_options(prepack=prepack_weights)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def assert_outputs_equal(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, want in expected.items():
        got = np.asarray(actual[name])
        want = np.asarray(want)
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


@functools.cache
def fixture_model(name: str) -> onnx.ModelProto:
    return onnx.load(str(fixture_path(name)))   # external data loaded: the fixtures are small


def all_default_domain(graph: onnx.GraphProto) -> bool:
    return all(node.domain in ("", "ai.onnx") and all(all_default_domain(a.g) for a in node.attribute
                                                       if a.type == onnx.AttributeProto.GRAPH)
               for node in graph.node)


def _to_double(graph: onnx.GraphProto) -> None:
    """Every float32 tensor, type and cast of ``graph`` (and its subgraphs) made float64, in place."""
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for info in (*graph.input, *graph.output, *graph.value_info):
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type == TensorProto.FLOAT:
            tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _to_double(attribute.g)
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float64)))
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.DOUBLE


def float64_reference(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = onnx.ModelProto()
    model.CopyFrom(fixture_model(name))
    return float64_outputs(model, feeds)


def float64_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model``'s outputs computed in float64 by onnx's reference evaluator (``model`` is made float64 in place)."""
    _to_double(model.graph)
    evaluator = ReferenceEvaluator(model)
    doubled = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    names = [o.name for o in model.graph.output]
    return dict(zip(names, evaluator.run(None, doubled), strict=True))


def float_error(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The largest absolute difference over the float outputs."""
    return max((float(np.max(np.abs(outputs[k].astype(np.float64) - reference[k]), initial=0.0))
                for k in reference if np.asarray(outputs[k]).dtype == np.float32), default=0.0)


def assert_matches_onnxruntime(compiled, name: str, feeds: Mapping[str, np.ndarray],
                               got: Mapping[str, np.ndarray]) -> None:
    """``got`` (a run of ``compiled``, a fixture's compiled model) against onnxruntime with
    the same GEMM kernels (packed or not, as the schedule ran). Where a convolution's
    weight was fed, onnxruntime's NCHWc kernels (which need the weight when the session
    is built) are not used and the sum runs in another order: there the promise is an
    error against a float64 reference at most twice plain onnxruntime's (docs/memory.md)."""
    schedule = compiled.schedule
    fed = {w for s in schedule.segments for w in s.fed_weights}
    fed_convolution = any(step.op_type in ("Conv", "ConvTranspose") and set(step.inputs) & fed
                          for step in schedule.steps)
    if fed_convolution and all_default_domain(fixture_model(name).graph):
        exact = float64_reference(name, dict(feeds))
        plain = float_error(reference_outputs(fixture_path(name), feeds), exact)
        assert float_error(dict(got), exact) <= 2 * plain
        return
    assert_outputs_equal(got, reference_outputs(fixture_path(name), feeds, prepack_weights=schedule.packed_kernels))


def run_python(code: str, *args: str) -> str:
    """The last line ``code`` prints, run in a fresh interpreter (for RSS measured from scratch)."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_name(request: pytest.FixtureRequest) -> str:
    return request.param


__all__ = ["FIXTURE_NAMES", "REPO", "all_default_domain", "assert_matches_onnxruntime", "assert_outputs_equal",
           "example_feeds", "fixture_model", "fixture_path", "float64_outputs", "float64_reference", "float_error",
           "reference_outputs", "run_python"]
