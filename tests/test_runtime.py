"""Runtime: segment extraction and execution on graphs the ONNX backend suite found bugs in.

Every case runs with one node per segment and no whole-model shortcut, so each
node goes through its own segment model and session, and is compared with
plain onnxruntime on the whole model.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

import hyperion
from tests.conftest import RUNTIME_AXES_MEAN, assert_outputs_equal

# Sequences and optionals crossing segments: inputs with no single shape.
SEQUENCES_AND_OPTIONALS = """<ir_version: 8, opset_import: ["" : 18]>
    g (seq(float[2]) s, optional(float[2]) o, float[2] x) => (float[3,2] y, float[2] z) {
        t = SequenceInsert (s, x)
        y = ConcatFromSequence <axis = 0, new_axis = 1> (t)
        present = OptionalHasElement (o)
        v = OptionalGetElement (o)
        z = Where (present, v, x)
    }"""

def _per_node(text: str) -> tuple[onnx.ModelProto, hyperion.CompiledModel]:
    model = onnx.parser.parse_model(text)
    return model, hyperion.compile(model, max_segment_steps=1, whole_model_shortcut=False)


def _onnxruntime(model: onnx.ModelProto, feeds: Mapping[str, Any]) -> dict[str, Any]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def test_segments_of_dead_nodes_are_not_run() -> None:
    # 'unused' and 'scale' feed nothing: their segments have no outputs, which
    # onnxruntime refuses to load (a lone Constant) or to run (fetching nothing).
    model, compiled = _per_node("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[2,3] x) => (float[2,3] y) {
            scale = Constant <value = float {2.0}> ()
            unused = Neg (x)
            y = Relu (x)
        }""")
    assert [s.outputs for s in compiled.schedule.segments].count(()) == 2
    feeds = {"x": np.array([[-1, 2, -3], [4, -5, 6]], np.float32)}
    assert_outputs_equal(compiled.run(feeds), _onnxruntime(model, feeds))


def test_scan_body_reading_an_outer_constant_gets_its_value() -> None:
    # The body's Unsqueeze takes its axes from the outer scope. Fed as a segment
    # input, the axes are unknown when the session is built, so the body's state
    # has no shape and Scan refuses to run; the Constant is recomputed inside instead.
    model, compiled = _per_node("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[2,1] s0, float[3,2] xs) => (float[2,1] last, float[3,2,1] ys) {
            axes = Constant <value = int64[1] {-1}> ()
            last, ys = Scan <num_scan_inputs = 1,
                             body = step (float[2,1] s, float[2] x) => (float[2,1] s_out, float[2,1] y) {
                u = Unsqueeze (x, axes)
                s_out = Add (s, u)
                y = Identity (s_out)
            }> (s0, xs)
        }""")
    schedule = compiled.schedule
    scan = next(seg for seg in schedule.segments if schedule.steps[seg.first_step].op_type == "Scan")
    assert scan.inlined_constants == ("axes",) and "axes" not in scan.model_inputs
    feeds = {"s0": np.zeros((2, 1), np.float32), "xs": np.arange(6, dtype=np.float32).reshape(3, 2)}
    assert_outputs_equal(compiled.run(feeds), _onnxruntime(model, feeds))


def test_sequence_and_optional_inputs_are_fed_as_they_are() -> None:
    # A list feed has no single shape: it must not be taken for a tensor when the
    # plan is looked up by the feeds' shapes.
    model, compiled = _per_node(SEQUENCES_AND_OPTIONALS)
    feeds = {"s": [np.ones(2, np.float32), np.full(2, 2, np.float32)], "o": np.full(2, 7, np.float32),
             "x": np.array([3, 4], np.float32)}
    assert_outputs_equal(compiled.run(feeds), _onnxruntime(model, feeds))


def test_shapes_onnx_cannot_infer_are_not_declared_to_onnxruntime() -> None:
    # ReduceMean over axes computed at run time keeps both dims ([1, 1]); a guessed
    # [3, 4] declared on the next segment's input made onnxruntime reject the feed.
    model, compiled = _per_node(RUNTIME_AXES_MEAN)
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    assert_outputs_equal(compiled.run(feeds), _onnxruntime(model, feeds))


def test_a_dropped_model_releases_its_runtime_at_once() -> None:
    # The session pool used to hold a bound method of its runtime: a cycle that kept
    # every session (weights, thread pools) alive until a full garbage collection.
    model, compiled = _per_node("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[2,3] x) => (float[2,3] y) {
            a = Relu (x)
            y = Neg (a)
        }""")
    compiled.run({"x": np.ones((2, 3), np.float32)})
    schedule = weakref.ref(compiled.schedule)
    gc.disable()
    try:
        del compiled
        assert schedule() is None
    finally:
        gc.enable()


def _smallest_cap(model: onnx.ModelProto) -> int:
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(model, memory_limit=1)
    return refused.value.smallest_limit_bytes


def test_an_input_nothing_reads_is_not_held() -> None:
    # The plan counts graph inputs while they are needed; 'unused' never is, so the
    # runtime must not hold it either, or the bytes it holds exceed the plan's.
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[1,8] x, float[1,256] unused) => (float[1,8] y) {
            a = Relu (x)
            y = Neg (a)
        }""")
    cap = _smallest_cap(model)
    compiled = hyperion.compile(model, memory_limit=cap, max_segment_steps=1)
    feeds = {"x": np.ones((1, 8), np.float32), "unused": np.ones((1, 256), np.float32)}
    assert_outputs_equal(compiled.run(feeds), _onnxruntime(model, feeds))
    assert compiled.stats.held_peak_bytes <= compiled.schedule.peak_bytes <= cap
    assert compiled.stats.peak_bytes <= cap


def test_the_smallest_limit_adaptive_names_can_be_met() -> None:
    # normal and memory_opt each name the smallest cap they can meet; adaptive used to
    # name a figure read off an uncapped plan (the streaming fallback's), 8 bytes short.
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 18]>
        g (float[1,8] x0) => (float[1,4] t12) <float[4,2] w0 = {1, 2, 3, 4, 5, 6, 7, 8}> {
            t1, t2 = Split <axis = 1, num_outputs = 2> (x0)
            t3 = Sub (t1, t2)
            t4 = Sigmoid (t3)
            t5 = Relu (t2)
            t6, t7 = Split <axis = 1, num_outputs = 2> (t1)
            t8, t9 = Split <axis = 1, num_outputs = 2> (t2)
            t10 = Concat <axis = 1> (t9, x0)
            t11 = MatMul (t2, w0)
            t12 = Relu (t3)
        }""")
    cap = _smallest_cap(model)
    compiled = hyperion.compile(model, memory_limit=cap)
    feeds = {"x0": np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)}
    assert_outputs_equal(compiled.run(feeds), _onnxruntime(model, feeds))
    assert compiled.stats.peak_bytes <= cap
    with pytest.raises(hyperion.MemoryLimitError):
        hyperion.compile(model, memory_limit=cap - 1)


@pytest.mark.parametrize(("limit", "batch"), [(None, 1), ("1.5MB", 1), ("3MB", 8)])
def test_progress_counts_every_segment_of_every_chunk(limit: str | None, batch: int) -> None:
    from fixtures import example_feeds, fixture_path

    cm = hyperion.compile(fixture_path("demo"), memory_limit=limit, input_shapes={"image": [batch, 3, 64, 64]})
    calls: list[tuple[int, int]] = []
    cm.run(example_feeds("demo", batch=batch), lambda done, total: calls.append((done, total)))
    chunks = -(-batch // cm.schedule.batch_chunk) if cm.schedule.mode == "streaming" else 1
    total = len(cm.schedule.segments) * chunks
    assert calls == [(done, total) for done in range(1, total + 1)]
    assert (cm.schedule.mode, chunks > 1) == {None: ("normal", False), "1.5MB": ("memory_opt", False),
                                              "3MB": ("streaming", True)}[limit]
