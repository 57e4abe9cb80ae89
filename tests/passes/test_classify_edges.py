"""classify_edges: hand-labelled edge kinds on inline graphs and on the fixtures."""

from __future__ import annotations

import pytest

from hyperion.ir import EdgeKind
from hyperion.passes.classify_edges import ClassifyEdgesPass, classify_edges
from tests.conftest import fixture_path
from tests.passes.helpers import kinds, program_from_model, program_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def classified(text: str) -> dict[tuple[str, str], str]:
    program = program_from_text(text)
    ClassifyEdgesPass()(program)
    return kinds(program)


def test_chain_is_sequential_and_reports_modified() -> None:
    program = program_from_text(f"""{HEADER}
    g (float[4] x) => (float[4] y) {{
        a = Relu(x)
        b = Sigmoid(a)
        y = Tanh(b)
    }}""")
    first = ClassifyEdgesPass()(program)
    assert first.modified
    assert kinds(program) == {("Relu_0", "Sigmoid_1"): "sequential", ("Sigmoid_1", "Tanh_2"): "sequential"}
    assert not ClassifyEdgesPass()(program).modified  # already classified: a no-op


def test_graph_without_nodes_has_no_edges() -> None:
    program = program_from_text(f"""{HEADER}
    g (float[4] x) => (float[4] x) {{
    }}""")
    result = ClassifyEdgesPass()(program)
    assert not result.modified and kinds(program) == {}


def test_identity_shortcut_is_residual() -> None:
    assert classified(f"""{HEADER}
    g (float[4] x) => (float[4] y) {{
        a = Relu(x)
        b = Sigmoid(a)
        c = Tanh(b)
        y = Add(c, a)
    }}""") == {("Relu_0", "Sigmoid_1"): "sequential", ("Sigmoid_1", "Tanh_2"): "sequential",
               ("Tanh_2", "Add_3"): "sequential", ("Relu_0", "Add_3"): "residual"}


def test_projection_shortcut_first_edge_is_residual() -> None:
    # fork -> proj -> add is shorter than fork -> m1 -> m2 -> add: fork->proj is the skip.
    assert classified(f"""{HEADER}
    g (float[4] x) => (float[4] y) {{
        f = Relu(x)
        m1 = Sigmoid(f)
        m2 = Tanh(m1)
        p = Neg(f)
        y = Add(m2, p)
    }}""") == {("Relu_0", "Sigmoid_1"): "sequential", ("Sigmoid_1", "Tanh_2"): "sequential",
               ("Tanh_2", "Add_4"): "sequential", ("Relu_0", "Neg_3"): "residual",
               ("Neg_3", "Add_4"): "sequential"}


def test_equal_length_branches_are_not_skips() -> None:
    assert set(classified(f"""{HEADER}
    g (float[4] x) => (float[4] y) {{
        f = Relu(x)
        a = Sigmoid(f)
        b = Tanh(f)
        y = Add(a, b)
    }}""").values()) == {"sequential"}


def test_concat_of_branches_uses_only_the_identity_rule() -> None:
    # Inception-style: branches of different lengths joined by Concat are not skips.
    assert set(classified(f"""{HEADER}
    g (float[1,4] x) => (float[1,8] y) {{
        f = Relu(x)
        a = Sigmoid(f)
        b1 = Tanh(f)
        b2 = Neg(b1)
        y = Concat <axis = 1> (a, b2)
    }}""").values()) == {"sequential"}


SDPA = f"""{HEADER}
g (float[2,4] xq, float[2,4] xk, float[2,4] xv, float[2,2] mask) => (float[2,4] y) {{
    q = Relu(xq)
    k = Relu(xk)
    v = Relu(xv)
    kt = Transpose(k)
    s = MatMul(q, kt)
    d = Constant <value = float {{2.0}}> ()
    scaled = Div(s, d)
    m = Relu(mask)
    masked = Add(scaled, m)
    p = Softmax(masked)
    y = MatMul(p, v)
}}"""


def test_scaled_dot_product_attention_pattern() -> None:
    got = classified(SDPA)
    attention = {edge for edge, kind in got.items() if kind == "attention"}
    assert attention == {
        ("Relu_0", "MatMul_4"),       # Q into scores
        ("Transpose_3", "MatMul_4"),  # Kᵀ into scores
        ("MatMul_4", "Div_6"),        # scores -> scale
        ("Relu_7", "Add_8"),          # mask
        ("Div_6", "Add_8"),
        ("Add_8", "Softmax_9"),
        ("Softmax_9", "MatMul_10"),   # probabilities
        ("Relu_2", "MatMul_10"),      # V
    }
    assert got[("Relu_1", "Transpose_3")] == "sequential"  # K before the transpose is not inside the pattern
    assert got[("Constant_5", "Div_6")] == "sequential"    # the scale constant carries no activation


def test_matmul_with_weight_is_not_attention() -> None:
    got = classified(f"""{HEADER}
    g (float[2,4] x) => (float[2,2] y) <float[4,2] w = {{1,2,3,4,5,6,7,8}}> {{
        h = MatMul(x, w)
        r = Relu(h)
        p = Softmax(r)
        y = MatMul(p, p)
    }}""")
    assert EdgeKind.ATTENTION.value not in got.values()


@pytest.mark.parametrize(("fixture", "expected"), [
    ("seed_residual", {
        ("input_layer", "conv1"): "sequential", ("conv1", "conv2"): "sequential",
        ("input_layer", "residual"): "residual",          # the seed labels 0 -> 3 RESIDUAL
        ("conv2", "output"): "sequential", ("residual", "output"): "sequential"}),
    ("seed_attention", {
        ("embed", "query"): "sequential", ("embed", "key"): "sequential", ("embed", "value"): "sequential",
        ("query", "attention"): "attention", ("key", "attention"): "attention",
        ("value", "attention"): "attention",
        ("embed", "norm"): "residual", ("attention", "norm"): "sequential",
        ("norm", "ffn"): "sequential", ("norm", "output"): "residual", ("ffn", "output"): "sequential"}),
])
def test_seed_examples_match_the_seed_labels(fixture: str, expected: dict) -> None:
    program = program_from_model(str(fixture_path(fixture)))
    ClassifyEdgesPass()(program)
    assert kinds(program) == expected


def _non_sequential(fixture: str) -> dict[tuple[str, str], str]:
    program = program_from_model(str(fixture_path(fixture)))
    ClassifyEdgesPass()(program)
    return {edge: kind for edge, kind in kinds(program).items() if kind != "sequential"}


def test_resnet_block_identity_and_projection_shortcuts() -> None:
    assert _non_sequential("resnet_block") == {
        ("stem_relu", "block1_skip_add"): "residual",       # identity shortcut
        ("block1_relu2", "block2_shortcut"): "residual",    # projection shortcut (1x1 conv)
    }


def test_unet_long_skips() -> None:
    assert _non_sequential("unet") == {("enc1_relu", "concat2"): "residual",
                                       ("enc2_relu", "concat1"): "residual"}


def test_transformer_block_attention_and_residuals() -> None:
    got = _non_sequential("transformer_block")
    assert {e for e, k in got.items() if k == "attention"} == {
        ("q_transpose", "scores"), ("k_transpose", "scores"), ("scores", "scale"), ("scale", "mask_add"),
        ("mask_add", "softmax"), ("softmax", "context"), ("v_transpose", "context")}
    # attn_residual -> ffn_residual is the second residual; x -> attn_residual comes from a graph
    # input (no edge). GELU's x * 0.5 * (1 + erf(x / sqrt 2)) reuses x: a skip by SPEC's rule.
    assert {e for e, k in got.items() if k == "residual"} == {
        ("attn_residual", "ffn_residual"), ("ffn1_bias", "gelu_mul")}


def test_fused_attention_op_edges_are_attention() -> None:
    got = _non_sequential("transformer_block_fused")
    assert got[("ln1", "attention")] == "attention"
    assert {e for e, k in got.items() if k == "attention"} == {("ln1", "attention")}


def test_projection_shortcut_with_generated_weights_is_residual() -> None:
    # The ONNX package's light models generate their weights with ConstantOfShape:
    # the shortcut's Mul then has two producers, but one computes a constant, so
    # the chain is still single-input and fork->proj is the skip.
    result = classified(f"""{HEADER}
    g (float[4] x) => (float[4] y) {{
        f = Relu(x)
        m1 = Sigmoid(f)
        m2 = Tanh(m1)
        shape = Constant <value = int64[1] {{4}}> ()
        w = ConstantOfShape <value = float[1] {{0.5}}> (shape)
        p = Mul(f, w)
        y = Add(m2, p)
    }}""")
    assert result[("Relu_0", "Mul_5")] == "residual"
    assert [kind for edge, kind in result.items() if edge != ("Relu_0", "Mul_5")] == ["sequential"] * 6


def test_reachability_memory_grows_with_the_joins_not_the_square_of_the_nodes() -> None:
    import tracemalloc

    from fixtures.irregular import transformer

    graph = program_from_model(transformer(300)).graph   # 10,201 nodes, 2 residual joins a layer
    tracemalloc.start()
    try:
        result = classify_edges(graph)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(kind is EdgeKind.RESIDUAL for kind in result.values()) == 3 * 300 - 1
    # A bit per node per node would be 10,201^2 bits = 13 MB of sets alone (22.8 MB measured).
    assert peak < 10 * 2**20
