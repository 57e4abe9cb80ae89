"""Upper bounds of data-dependent sizes (hyperion/frontend/bounds.py), one rule per test."""

from __future__ import annotations

import onnx.parser

from fixtures.dynamic_shapes import if_branches, non_max_suppression, nonzero, topk
from hyperion.frontend import import_model, load_source
from hyperion.frontend.bounds import Bound, guessed_tensors, unsized_tensors, upper_bounds


def _bounds(model: onnx.ModelProto) -> tuple[list[str], dict[str, Bound]]:
    imported = import_model(load_source(model))
    unsized = unsized_tensors(imported)
    return unsized, upper_bounds(imported, unsized)


def test_nonzero_is_bounded_by_the_elements_of_its_input_and_the_bound_flows_on() -> None:
    unsized, bounds = _bounds(nonzero(1000))
    assert set(unsized) == {"idx", "t", "y"}
    assert bounds["idx"] == Bound(8 * 1000, (1, 1000))
    assert bounds["t"] == Bound(8 * 1000, (1000, 1))   # Transpose permutes the bound
    assert bounds["y"] == Bound(8 * 1000, (1000, 1))   # Mul broadcasts it with a scalar


def test_topk_with_a_computed_k_is_bounded_by_its_input() -> None:
    _, bounds = _bounds(topk(4096))
    assert bounds["v"] == Bound(4 * 4096, (4096,)) and bounds["i"] == Bound(8 * 4096, (4096,))


def test_non_max_suppression_keeps_at_most_its_maximum_per_class() -> None:
    _, bounds = _bounds(non_max_suppression(boxes=500, classes=3, max_out=20))
    assert bounds["sel"] == Bound(8 * 3 * 60, (60, 3))
    _, bounds = _bounds(non_max_suppression(boxes=10, classes=3, max_out=20))
    assert bounds["sel"] == Bound(8 * 3 * 30, (30, 3))   # never more than the boxes


def test_if_is_the_larger_branch_even_where_onnxruntime_guessed_the_smaller() -> None:
    imported = import_model(load_source(if_branches(64)))
    # onnxruntime's symbolic inference sized the If by its then branch (64 floats)...
    assert imported.graph.tensors["r"].nbytes == 4 * 64
    assert {"r", "f", "y"} <= guessed_tensors(imported)
    unsized = unsized_tensors(imported)
    # ... but the else branch holds 64 x 64: the bound is the larger, in bytes (ranks differ).
    assert upper_bounds(imported, unsized)["r"] == Bound(4 * 64 * 64)


def test_a_loop_with_a_constant_trip_count_is_bounded_one_with_a_runtime_count_is_not() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[16] x, int64 n) => (float[?, 16] constant_rows, float[?, 16] runtime_rows) {
        cond = Constant <value = bool {1}> ()
        trips = Constant <value = int64 {7}> ()
        a1, constant_rows = Loop (trips, cond, x) <body = b1 (int64 i, bool c, float[16] a)
            => (bool co, float[16] ao, float[16] row) { co = Identity(c)  ao = Neg(a)  row = Abs(a) }>
        a2, runtime_rows = Loop (n, cond, x) <body = b2 (int64 i, bool c, float[16] a)
            => (bool co, float[16] ao, float[16] row) { co = Identity(c)  ao = Neg(a)  row = Abs(a) }>
    }"""
    _, bounds = _bounds(onnx.parser.parse_model(text))
    assert bounds["constant_rows"] == Bound(7 * 16 * 4, (7, 16))
    assert bounds["a2"] == Bound(16 * 4, (16,))      # a carried value: as the body declares it
    assert "runtime_rows" not in bounds


def test_range_sized_by_a_computed_value_has_no_bound() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (int64[4] x) => (int64[?] r) {
        n = ReduceMax <keepdims = 0> (x)
        zero = Constant <value = int64 {0}> ()
        one = Constant <value = int64 {1}> ()
        r = Range(zero, n, one)
    }"""
    unsized, bounds = _bounds(onnx.parser.parse_model(text))
    assert unsized == ["r"] and bounds == {}
