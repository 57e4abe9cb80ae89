"""Golden step tables: inline ONNX text in, the compiled schedule as a text table out.

One test per scenario, in the Before/Expected style: the model is written inline
(weights added with numpy where text is awkward), compiled with the options the
test names, and the schedule rendered by ``tests/golden_table.py`` -- step order,
the kinds of every step's incoming edges, frees, loads and evicts, segments, live
bytes, and the summary -- must equal ``tests/golden/<scenario>.txt``. Every
scenario also runs the model and checks its outputs against plain onnxruntime.

To regenerate the tables after an intended change, run

    HYPERION_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

and review the diff of ``tests/golden/`` like code: a table must say what the
rules of the passes say (see ``tests/golden/README.md``). Without the flag, a
missing or differing table fails the test with a unified diff.

Only the public surface is used: ``hyperion.compile``, ``CompiledModel.schedule``
and ``CompiledModel.run``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import hyperion
from hyperion import Schedule
from hyperion.runtime import session_options
from tests.golden_table import GOLDEN_DIR, UPDATE_ENV, assert_golden, render

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


# -- helpers ---------------------------------------------------------------------------
def parse(text: str, weights: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A checked model from ONNX text, with ``weights`` appended as initializers."""
    model = onnx.parser.parse_model(HEADER + text)
    for name, value in (weights or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model)
    return model


def random_weights(seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def random_feeds(model: onnx.ModelProto, seed: int,
                 shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for every graph input (``shapes`` for symbolic dims)."""
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = (shapes or {}).get(value.name) or tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def onnxruntime_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                        prepack_weights: bool = True) -> dict[str, np.ndarray]:
    """Plain onnxruntime's outputs, with the GEMM kernels of a schedule packed or not."""
    session = ort.InferenceSession(model.SerializeToString(), session_options(prepack=prepack_weights),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def check_scenario(scenario: str, title: str, model: onnx.ModelProto, *, seed: int = 0,
                   feed_shapes: Mapping[str, tuple[int, ...]] | None = None, **options: Any) -> Schedule:
    """Compile ``model`` with ``options``, compare its table with ``golden/<scenario>.txt``
    and its outputs with onnxruntime's; returns the schedule for further checks."""
    compiled = hyperion.compile(model, **options)
    try:
        schedule = compiled.schedule
        assert_golden(GOLDEN_DIR / f"{scenario}.txt", render(schedule, title, options))
        feeds = random_feeds(model, seed, feed_shapes)
        actual = compiled.run(feeds)
    finally:
        compiled.close()
    expected = onnxruntime_outputs(model, feeds, prepack_weights=schedule.packed_kernels)
    assert set(actual) == set(expected)
    exact = str(getattr(schedule.mode, "value", schedule.mode)) == "normal"
    for name, want in expected.items():
        if exact:
            np.testing.assert_array_equal(actual[name], want, err_msg=name)
        else:
            np.testing.assert_allclose(actual[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    return schedule


def kind_of(schedule: Schedule, src: str, dst: str) -> str:
    (kind,) = [e.kind for e in schedule.edges if (e.src, e.dst) == (src, dst)]
    return str(getattr(kind, "value", kind))


# -- scenarios -------------------------------------------------------------------------
def test_chain_is_sequential_and_frees_each_intermediate_at_its_last_use() -> None:
    model = parse("""
    g (float[1,64] x) => (float[1,64] y) {
        [relu] a = Relu (x)
        [sigmoid] b = Sigmoid (a)
        [tanh] c = Tanh (b)
        [neg] y = Neg (c)
    }""")
    schedule = check_scenario("chain", "a straight chain: sequential edges, each tensor freed at its last use",
                              model, mode="normal")
    assert [s.frees for s in schedule.steps] == [("x",), ("a",), ("b",), ("c",)]


def test_identity_residual_block_marks_the_skip_edge_residual() -> None:
    model = parse("""
    g (float[1,64] x) => (float[1,64] y) {
        [stem] h = Relu (x)
        [f1] a = Tanh (h)
        [f2] b = Sigmoid (a)
        [add] y = Add (h, b)
    }""")
    schedule = check_scenario("identity_residual", "identity residual block: y = h + f(h)", model, mode="normal")
    assert kind_of(schedule, "stem", "add") == "residual"


def test_projection_shortcut_marks_the_1x1_conv_edge_residual() -> None:
    weights = random_weights(1, w1=(8, 4, 3, 3), w2=(8, 8, 3, 3), wp=(8, 4, 1, 1))
    model = parse("""
    g (float[1,4,4,4] x) => (float[1,8,4,4] y) {
        [stem] h = Relu (x)
        [conv1] a = Conv <pads = [1, 1, 1, 1]> (h, w1)
        [relu1] b = Relu (a)
        [conv2] c = Conv <pads = [1, 1, 1, 1]> (b, w2)
        [proj] s = Conv (h, wp)
        [add] y = Add (c, s)
    }""", weights)
    # Only stem->proj is residual: stem reaches add through proj (one node) and through
    # conv1, relu1, conv2 (longer). Step 0 holds every weight (3584 bytes), x and h (512)
    # and, for the session's creation, the largest weight's original again (w2, 2304).
    schedule = check_scenario("projection_shortcut", "projection shortcut: y = f(h) + conv1x1(h)", model,
                              mode="normal")
    assert kind_of(schedule, "stem", "proj") == "residual"
    assert kind_of(schedule, "stem", "conv1") == "sequential"


def test_scaled_dot_product_attention_marks_the_chain_attention() -> None:
    weights = random_weights(2, wq=(16, 16), wk=(16, 16), wv=(16, 16))
    model = parse("""
    g (float[1,8,16] x) => (float[1,8,16] y) <float sqrt_d = {4.0}> {
        [stem] h = Relu (x)
        [q_proj] q = MatMul (h, wq)
        [k_proj] k = MatMul (h, wk)
        [v_proj] v = MatMul (h, wv)
        [k_t] kt = Transpose <perm = [0, 2, 1]> (k)
        [scores] s = MatMul (q, kt)
        [scale] d = Div (s, sqrt_d)
        [softmax] p = Softmax <axis = -1> (d)
        [context] y = MatMul (p, v)
    }""", weights)
    schedule = check_scenario("attention", "scaled dot-product attention: softmax(Q Kᵀ / 4) V", model,
                              mode="normal")
    assert kind_of(schedule, "softmax", "context") == "attention"
    assert kind_of(schedule, "k_proj", "k_t") == "sequential"


def test_diamond_runs_one_branch_to_its_end_before_the_other() -> None:
    # In the file's order both 1 KiB Concat outputs are live at wide_b: x (held by the
    # segment) 256 + h 256 + a1 1024 + b1 1024 = 2560 bytes.
    model = parse("""
    g (float[1,64] x) => (float[1,1] y) {
        [stem] h = Relu (x)
        [wide_a] a1 = Concat <axis = 1> (h, h, h, h)
        [wide_b] b1 = Concat <axis = 1> (h, h, h, h)
        [sum_a] a2 = ReduceSum <keepdims = 1> (a1)
        [max_b] b2 = ReduceMax <keepdims = 1> (b1)
        [join] y = Add (a2, b2)
    }""")
    schedule = check_scenario("diamond_order", "diamond: the file's order peaks at 2560 bytes", model,
                              mode="normal")
    assert [s.node for s in schedule.steps] != [n.name for n in model.graph.node]
    assert schedule.peak_bytes < 2560


def test_dead_node_output_is_freed_where_it_is_made() -> None:
    model = parse("""
    g (float[1,64] x) => (float[1,64] y) {
        [stem] h = Relu (x)
        [unused] d = Sigmoid (h)
        [tail] y = Tanh (h)
    }""")
    schedule = check_scenario("dead_node", "a dead node: its output d is read by nobody", model, mode="normal")
    (step,) = [s for s in schedule.steps if s.node == "unused"]
    assert "d" in step.frees


def test_memory_opt_under_a_cap_splits_into_segments_that_load_and_evict_weights() -> None:
    weights = random_weights(3, w1=(64, 64), w2=(64, 64), w3=(64, 64), w4=(64, 64))
    model = parse("""
    g (float[1,64] x) => (float[1,64] y) {
        [mm1] a = MatMul (x, w1)
        [r1] b = Relu (a)
        [mm2] c = MatMul (b, w2)
        [r2] d = Relu (c)
        [mm3] e = MatMul (d, w3)
        [r3] f = Relu (e)
        [mm4] y = MatMul (f, w4)
    }""", weights)
    # Weights are fed (memory_opt's default), held at their own size (16384 bytes each)
    # while their segment runs, with no packing and no prefetch. Segment 0 takes three
    # layers (w1-w3: 49152, plus two 256-byte rows and the 256-byte graph input held until
    # it returns: 49920); a fourth weight would exceed the cap, so mm4 runs alone.
    schedule = check_scenario("memory_opt_segments", "memory_opt: four 16 KiB weights under a 64000-byte cap",
                              model, mode="memory_opt", memory_limit=64_000)
    assert len(schedule.segments) > 1
    assert schedule.peak_bytes <= 64_000


def test_streaming_under_a_cap_runs_the_batch_in_chunks() -> None:
    weights = random_weights(4, w1=(64, 64), w2=(64, 64))
    model = parse("""
    g (float[N,64] x) => (float[N,64] y) {
        [mm1] a = MatMul (x, w1)
        [relu] b = Relu (a)
        [mm2] y = MatMul (b, w2)
    }""", weights)
    # The whole batch's x and y (32768 bytes) are pinned at every step; a chunk of 12 adds
    # 3072 bytes per activation: step 0 is w1 + its creation (32768) + x, a + pinned = 71680,
    # and a chunk of 13 would need 72704.
    schedule = check_scenario("streaming_chunks", "streaming: a batch of 64 under a 72000-byte cap", model,
                              feed_shapes={"x": (64, 64)}, mode="streaming", memory_limit=72_000,
                              input_shapes={"x": [64, 64]})
    assert schedule.batch_chunk is not None and 1 <= schedule.batch_chunk < 64


def test_single_identity_is_one_step_with_no_edges() -> None:
    model = parse("""
    g (float[1,64] x) => (float[1,64] y) {
        [identity] y = Identity (x)
    }""")
    schedule = check_scenario("single_identity", "a single Identity", model, mode="normal")
    assert len(schedule.steps) == 1 and not schedule.edges


# -- the update flag -------------------------------------------------------------------
def test_differing_golden_fails_with_a_diff_unless_the_update_flag_is_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    golden = tmp_path / "table.txt"
    golden.write_text("steps\n  0  relu\n", encoding="utf-8")
    monkeypatch.delenv(UPDATE_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception) as failure:
        assert_golden(golden, "steps\n  0  tanh\n")
    message = str(failure.value)
    assert "-  0  relu" in message and "+  0  tanh" in message and UPDATE_ENV in message
    assert golden.read_text(encoding="utf-8") == "steps\n  0  relu\n"  # untouched without the flag

    assert_golden(golden, "steps\n  0  relu\n")  # equal: passes

    monkeypatch.setenv(UPDATE_ENV, "1")
    assert_golden(golden, "steps\n  0  tanh\n")
    assert golden.read_text(encoding="utf-8") == "steps\n  0  tanh\n"


def test_missing_golden_fails_unless_the_update_flag_is_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    golden = tmp_path / "new.txt"
    monkeypatch.delenv(UPDATE_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match="missing"):
        assert_golden(golden, "summary\n")
    assert not golden.exists()

    monkeypatch.setenv(UPDATE_ENV, "1")
    assert_golden(golden, "summary\n")
    assert golden.read_text(encoding="utf-8") == "summary\n"
