"""Re-planned constructs beyond plain tensors (docs/dynamic_shapes.md), each from a model
of onnx's backend node tests it stands for: an observed empty sequence (Loop over a
sequence, SequenceMap expanded), an If whose taken branch returns a sequence (before opset
14, where Identity takes tensors only) or an optional, and Range fed numpy scalars. Each is
re-planned under a cap, runs twice (the second plans nothing) and equals plain onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

import hyperion
from hyperion.frontend.suffix import _value_info

CAP = "1MB"

# A Loop whose trip count is the data's and whose carried value starts as an empty sequence
# (onnx's test_loop13_seq): the observed [] has no element to type it; the model declares one.
LOOP_OVER_EMPTY_SEQUENCE = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64 trips, seq(float[]) empty) => (seq(float[]) grown) {
    go = Constant <value = bool {1}> ()
    grown = Loop (trips, go, empty) <body = body (int64 i, bool c, seq(float[]) s) => (bool co, seq(float[]) so) {
        co = Identity(c)
        zero = Constant <value = int64 {0}> ()
        one = Constant <value = int64 {1}> ()
        end = Add(i, one)
        r = Range(zero, end, one)
        f = Cast <to = 1> (r)
        so = SequenceInsert(s, f)
    }>
}"""

# An If whose branches return sequences of different lengths, at opset 13 (test_if_seq).
IF_SEQUENCE = """
<ir_version: 7, opset_import: ["" : 13]>
g (bool c, float[64] x) => (seq(float[64]) y) {
    y = If (c) <
        then_branch = t () => (seq(float[64]) a) { a = SequenceConstruct(x) },
        else_branch = e () => (seq(float[64]) b) {
            n = Neg(x)
            b = SequenceConstruct(x, n, x)
        }>
}"""

# An If whose branches return an empty optional or a sequence in one (test_if_opt).
IF_OPTIONAL = """
<ir_version: 8, opset_import: ["" : 16]>
g (bool c, float[64] x) => (optional(seq(float[64])) y) {
    y = If (c) <
        then_branch = t () => (optional(seq(float[64])) a) { a = Optional <type = seq(float[64])> () },
        else_branch = e () => (optional(seq(float[64])) b) {
            s = SequenceConstruct(x)
            b = Optional(s)
        }>
}"""

# Range over scalars the data gives (test_range_float_type_positive_delta_expanded).
RANGE_OF_SCALARS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float start, float limit, float delta) => (float[?] y) {
    r = Range(start, limit, delta)
    y = Sqrt(r)
}"""


def _model(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def _reference(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: np.asarray(v) if isinstance(v, np.generic) else v for k, v in feeds.items()})


def _assert_same(got: Any, want: Any) -> None:
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_same(a, b)
    elif want is None:
        assert got is None
    else:
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def _runs_like_onnxruntime(model: onnx.ModelProto, feeds: dict[str, Any]) -> hyperion.CompiledModel:
    cm = hyperion.compile(model, memory_limit=CAP)
    assert cm.schedule.replan is not None  # the data decides a size: the rest is planned at run time
    reference = _reference(model, feeds)
    for run in range(2):
        ours = cm.run(feeds)
        assert len(ours) == len(reference)
        for got, want in zip(ours.values(), reference, strict=True):
            _assert_same(got, want)
        assert cm.stats.peak_bytes <= hyperion.units.parse_size(CAP)
        assert cm.replans is not None
        assert cm.replans.last_run_plans >= 1 if run == 0 else cm.replans.last_run_plans == 0
    return cm


@pytest.mark.parametrize("trips", [0, 3])
def test_an_observed_empty_sequence_is_typed_by_the_model(trips: int) -> None:
    model = _model(LOOP_OVER_EMPTY_SEQUENCE)
    cm = _runs_like_onnxruntime(model, {"trips": np.array(trips), "empty": []})
    assert cm.replans is not None and cm.replans.plans_made == 1


@pytest.mark.parametrize("condition", [True, False])
def test_a_taken_branch_that_returns_a_sequence_before_opset_14(condition: bool) -> None:
    x = np.arange(64, dtype=np.float32)
    _runs_like_onnxruntime(_model(IF_SEQUENCE), {"c": np.array(condition), "x": x})


@pytest.mark.parametrize("condition", [True, False])
def test_a_taken_branch_that_returns_an_optional(condition: bool) -> None:
    x = np.arange(64, dtype=np.float32)
    _runs_like_onnxruntime(_model(IF_OPTIONAL), {"c": np.array(condition), "x": x})


def test_range_fed_numpy_scalars() -> None:
    feeds = {"start": np.float32(1.0), "limit": np.float32(1000.0), "delta": np.float32(2.5)}
    _runs_like_onnxruntime(_model(RANGE_OF_SCALARS), feeds)


def test_an_empty_sequence_nothing_types_is_refused_naming_it() -> None:
    with pytest.raises(hyperion.UnsupportedModelError, match="'seq_in'"):
        _value_info("seq_in", [], None)


# A Scan sized by the value of a scalar the data gives (the scale of onnx's
# test_linear_attention_*_expanded), whose body reshapes by an outer Constant: onnxruntime
# runs a Scan only when its inference shaped every body output, so in the rest the constant
# stays a constant and the observed scalar keeps the shape the prefix declared for it.
SCAN_OVER_OBSERVED_SCALAR = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3, 8] x) => (float[?] y) {
    s = ReduceMax <keepdims = 0> (x)
    shape = Constant <value = int64[2] {2, 4}> ()
    init = Constant <value = float[8] {0, 0, 0, 0, 0, 0, 0, 0}> ()
    final, rows = Scan <num_scan_inputs = 1, body = body (float[8] state, float[8] row) => (float[] next, float[] out) {
        scaled = Mul(row, s)
        next = Add(state, scaled)
        out = Reshape(scaled, shape)
    }> (init, x)
    flat = Constant <value = int64[1] {-1}> ()
    y = Reshape(rows, flat)
}"""


def test_a_scan_whose_body_shapes_depend_on_outer_values() -> None:
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    model = onnx.parser.parse_model(SCAN_OVER_OBSERVED_SCALAR)
    cm = _runs_like_onnxruntime(model, {"x": x})
    assert cm.schedule.replan is not None and {p.tensor for p in cm.schedule.replan.points} >= {"s", "shape"}
