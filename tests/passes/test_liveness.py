"""liveness: first and last use of every tensor, and what is freed after each step."""

from __future__ import annotations

from hyperion.ir import ExecutionMode
from hyperion.passes.liveness import BEFORE_FIRST_STEP, Interval, compute_liveness, step_live_bytes
from tests.conftest import fixture_path
from tests.passes.helpers import program_from_model, program_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def test_seed_residual_first_and_last_use() -> None:
    program = program_from_model(str(fixture_path("seed_residual")))
    graph = program.graph
    liveness = compute_liveness(graph, graph.file_order())
    assert liveness.order == ("input_layer", "conv1", "conv2", "residual", "output")
    assert liveness.intervals == {
        "x": Interval(BEFORE_FIRST_STEP, 0),
        "input_layer_out": Interval(0, 3),   # read by conv1 (1) and by the skip branch (3)
        "conv1_out": Interval(1, 2),
        "conv2_out": Interval(2, 4),
        "residual_out": Interval(3, 4),
        "y": Interval(4, 4),
    }
    assert liveness.frees == (("x",), (), ("conv1_out",), ("input_layer_out",), ("conv2_out", "residual_out"))
    assert set(liveness.weight_intervals) == {"input_layer.weight", "conv1.weight", "conv2.weight"}


def test_outputs_are_never_freed_and_unread_tensors_die_at_once() -> None:
    program = program_from_text(f"""{HEADER}
    g (float[4] x) => (float[4] y, float[4] a) {{
        a = Relu(x)
        unused = Neg(a)
        y = Sigmoid(a)
    }}""")
    graph = program.graph
    liveness = compute_liveness(graph, graph.file_order())
    assert liveness.intervals["a"] == Interval(0, 2)        # an output lives to the end
    assert liveness.intervals["unused"] == Interval(1, 1)   # nobody reads it: freed right after
    freed = {t for step in liveness.frees for t in step}
    assert "a" not in freed and "y" not in freed and "unused" in freed


def test_step_bytes_count_inputs_activations_and_weights() -> None:
    program = program_from_text(f"""{HEADER}
    g (float[4] x) => (float[4] y) <float[4] w = {{1,2,3,4}}> {{
        a = Add(x, w)
        y = Relu(a)
    }}""")
    graph = program.graph
    liveness = compute_liveness(graph, graph.file_order())
    # step 0: x (16) + a (16) + w (16, every weight in normal mode); step 1: a + y + w.
    assert step_live_bytes(graph, liveness, ExecutionMode.NORMAL) == [48, 48]
    # memory_opt: w only at the step that reads it.
    assert step_live_bytes(graph, liveness, ExecutionMode.MEMORY_OPT) == [48, 32]
