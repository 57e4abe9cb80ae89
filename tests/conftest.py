"""Shared test helpers: fixture models, plain-onnxruntime references, output checks."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the fixtures package lives at the repo root

from fixtures import FIXTURE_NAMES, example_feeds, fixture_path  # noqa: E402
from hyperion.runtime import session_options  # noqa: E402

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


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_name(request: pytest.FixtureRequest) -> str:
    return request.param


__all__ = ["FIXTURE_NAMES", "REPO", "assert_outputs_equal", "example_feeds", "fixture_path",
           "reference_outputs"]
