"""batch_separable: which graphs can be split along axis 0, and the op named when one cannot."""

from __future__ import annotations

import onnx
import pytest

from hyperion.errors import UnsupportedModelError
from hyperion.frontend import ImportedModel, import_model, load_source
from hyperion.passes import Program
from hyperion.passes.batch.separable import BatchSeparability, BatchSeparablePass, BatchState, analyze
from tests.conftest import fixture_path

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def analyzed(body: str, signature: str = "(float[4, 8] x) => (float[4, 8] y)",
             header: str = HEADER) -> BatchSeparability:
    model = onnx.parser.parse_model(f"{header}\ng {signature} {{\n{body}\n}}")
    return batch_analysis(import_model(load_source(model)))


def batch_analysis(imported: ImportedModel) -> BatchSeparability:
    return analyze(imported.graph)


def refused_op(result: BatchSeparability) -> str:
    assert not result.separable
    return result.offenders[0].op_type


@pytest.mark.parametrize("body", [
    "y = Relu(x)",
    "b = Constant <value = float[1, 8] {1, 2, 3, 4, 5, 6, 7, 8}> ()\n y = Add(x, b)",
    "w = Constant <value = float[8, 8] {" + ", ".join(["0.5"] * 64) + "}> ()\n y = MatMul(x, w)",
    "y = Softmax <axis = -1> (x)",
    "y = Softmax <axis = 1> (x)",
    "s = ReduceSum <keepdims = 1> (x, axes)\n y = Mul(x, s)",
    "t = Transpose <perm = [0, 1]> (x)\n y = Identity(t)",
    "y = LayerNormalization <axis = -1> (x, g, bias)",
])
def test_per_sample_graphs_are_separable(body: str) -> None:
    inits = "<int64[1] axes = {1}, float[8] g = {1, 1, 1, 1, 1, 1, 1, 1}, float[8] bias = {0, 0, 0, 0, 0, 0, 0, 0}>"
    result = analyzed(body, f"(float[4, 8] x) => (float[4, 8] y) {inits}")
    assert result.separable, [o.describe() for o in result.offenders]
    assert result.batch_size == 4 and result.states["y"] is BatchState.BATCHED


@pytest.mark.parametrize(("body", "op"), [
    ("y = Softmax <axis = 0> (x)", "Softmax"),
    ("t = Transpose <perm = [1, 0]> (x)\n y = Identity(t)", "Transpose"),
    ("f = Flatten <axis = 0> (x)\n y = Reshape(f, shape)", "Flatten"),
    ("s = ReduceSum <keepdims = 1> (x, axes0)\n y = Add(x, s)", "ReduceSum"),
    ("s = ReduceMean <keepdims = 1> (x)\n y = Add(x, s)", "ReduceMean"),
    ("c = Concat <axis = 0> (x, x)\n y = Slice(c, starts, ends)", "Concat"),
    ("g = Gather <axis = 0> (x, idx)\n y = Identity(g)", "Gather"),
    ("r = Reshape(x, flat)\n y = Reshape(r, shape)", "Reshape"),
    ("y = Reshape(x, fixed)", "Reshape"),
    ("y = ArgMax <keepdims = 1> (x)", "ArgMax"),
    ("m = MatMul(w, x)\n y = Identity(m)", "MatMul"),
])
def test_ops_that_mix_samples_are_named(body: str, op: str) -> None:
    inits = ("<int64[2] shape = {4, 8}, int64[1] axes0 = {0}, int64[1] idx = {0}, int64[1] flat = {-1},"
             " int64[2] fixed = {4, 8}, int64[1] starts = {0}, int64[1] ends = {4}, float[4, 4] w = {"
             + ", ".join(["1"] * 16) + "}>")
    signature = f"(float[4, 8] x) => (float[4, 8] y) {inits}"
    assert refused_op(analyzed(body, signature)) == op


def test_batch_normalization_in_training_mode_mixes_samples() -> None:
    params = "<float[8] s = {1,1,1,1,1,1,1,1}, float[8] b = {0,0,0,0,0,0,0,0}, float[8] m = {0,0,0,0,0,0,0,0}, " \
             "float[8] v = {1,1,1,1,1,1,1,1}>"
    signature = f"(float[4, 8, 2, 2] x) => (float[4, 8, 2, 2] y) {params}"
    assert analyzed("y = BatchNormalization(x, s, b, m, v)", signature).separable
    training = analyzed("y, rm, rv = BatchNormalization <training_mode = 1> (x, s, b, m, v)", signature)
    assert refused_op(training) == "BatchNormalization"
    assert "batch statistics" in training.offenders[0].reason


def test_reshape_keeping_axis_zero_and_shapes_computed_from_the_chunk_are_separable() -> None:
    shape_inits = "<int64[2] keep = {0, -1}, int64[1] zero = {0}, int64[1] minus_one = {-1}>"
    signature = f"(float[4, 2, 4] x) => (float[4, 8] y) {shape_inits}"
    assert analyzed("y = Reshape(x, keep)", signature).separable
    dynamic = analyzed("""
        s = Shape(x)
        n = Gather <axis = 0> (s, zero)
        target = Concat <axis = 0> (n, minus_one)
        y = Reshape(x, target)""", signature)
    assert dynamic.separable, [o.describe() for o in dynamic.offenders]
    assert dynamic.states["target"] is BatchState.SHAPE


def test_a_count_over_the_batch_size_would_restart_in_every_chunk() -> None:
    inits = "<int64 zero = {0}, int64 one = {1}, int64[1] i0 = {0}>"
    result = analyzed("""
        s = Shape(x)
        n = Gather <axis = 0> (s, zero)
        r = Range(zero, n, one)
        f = Cast <to = 1> (r)
        u = Unsqueeze(f, i0)
        y = Add(x, u)""", f"(float[4] x) => (float[4] y) {inits}")
    assert refused_op(result) == "Range"


def test_embedding_lookup_keeps_the_batch_of_the_indices() -> None:
    table = "<float[10, 2] table = {" + ", ".join(["0.5"] * 20) + "}>"
    result = analyzed("y = Gather <axis = 0> (table, ids)", f"(int64[4, 3] ids) => (float[4, 3, 2] y) {table}")
    assert result.separable and result.states["y"] is BatchState.BATCHED


def test_an_output_computed_from_weights_alone_cannot_be_concatenated() -> None:
    result = analyzed("y = Relu(x)\n z = Neg(w)",
                      "(float[4, 8] x) => (float[4, 8] y, float[2] z) <float[2] w = {1, 2}>")
    assert refused_op(result) == "output" and result.offenders[0].node == "z"


def test_control_flow_and_unknown_ops_are_refused() -> None:
    result = batch_analysis(import_model(load_source(fixture_path("control_flow"))))
    assert refused_op(result) == "If"
    custom = analyzed("y = acme.Mystery(x)", header='<ir_version: 8, opset_import: ["" : 17, "acme" : 1]>')
    assert refused_op(custom) == "Mystery" and "no batch-separability rule" in custom.offenders[0].reason


def test_a_broadcast_input_of_leading_dim_one_is_shared() -> None:
    result = analyzed("y = Add(x, b)", "(float[4, 8] x, float[1, 8] b) => (float[4, 8] y)")
    assert result.separable and result.states["b"] is BatchState.SHARED


def test_the_fixtures_with_a_batch_dim_are_separable() -> None:
    for name, shape in (("demo", [6, 3, 64, 64]), ("dynamic_dims", [6, 8])):
        source = load_source(fixture_path(name))
        imported = import_model(source, {source.proto.graph.input[0].name: shape})
        result = batch_analysis(imported)
        assert result.separable and result.batch_size == 6, name


def test_the_pass_refuses_naming_the_node_and_op_and_records_the_analysis() -> None:
    model = onnx.parser.parse_model(f"{HEADER}\ng (float[4, 8] x) => (float[4, 8] y) {{ y = Softmax <axis = 0> (x) }}")
    program = Program(import_model(load_source(model)).graph)
    with pytest.raises(UnsupportedModelError, match=r"'Softmax_0' \(Softmax\).*axis 0"):
        BatchSeparablePass()(program)
    assert program.batch_separability is not None and not program.batch_separability.separable

    fine = onnx.parser.parse_model(f"{HEADER}\ng (float[4, 8] x) => (float[4, 8] y) {{ y = Relu(x) }}")
    program = Program(import_model(load_source(fine)).graph)
    result = BatchSeparablePass()(program)
    assert result.modified and program.batch_separability is not None and program.batch_separability.separable
    assert not BatchSeparablePass()(program).modified   # the same analysis again
