"""Row gathers: a Gather over a large weight reads only the rows its indices name, the plan
accounts those rows, and the outputs are onnxruntime's, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import hyperion
from hyperion.errors import RuntimeExecutionError
from hyperion.passes import Program
from hyperion.passes.pipeline import build_pipeline
from hyperion.runtime.rows import row_runs
from hyperion.schedule import Schedule
from tests.conftest import reference_outputs, run_python

ROWS, WIDTH = 4096, 96            # a 1.5 MiB float32 table
CAP_BYTES = 256 * 1024            # a sixth of the table


def gather_model(rows: int, width: int, index_shape: list[int], *, tied_matmul: bool = False,
                 shift: bool = True) -> onnx.ModelProto:
    """y = Gather(table, ids) + 1 (without ``shift``: the Gather alone); with ``tied_matmul``
    the table is also read by a MatMul."""
    table = np.random.default_rng(7).standard_normal((rows, width)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows" if shift else "y"], name="lookup", axis=0)]
    if shift:
        nodes.append(helper.make_node("Add", ["rows", "one"], ["y"], name="shift"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*index_shape, width])]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, index_shape)]
    if tied_matmul:
        nodes.append(helper.make_node("MatMul", ["x", "table"], ["z"], name="project"))
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, width]))
    graph = helper.make_graph(nodes, "row_gather", inputs, outputs,
                              [numpy_helper.from_array(table, "table"),
                               numpy_helper.from_array(np.ones(width, np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=1024)
    return path


@pytest.fixture(scope="module")
def external_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_external(gather_model(ROWS, WIDTH, [2, 32]), tmp_path_factory.mktemp("rows") / "gather.onnx")


def _row_gather_steps(schedule: Schedule) -> list:
    return [step for step in schedule.steps if step.row_gather is not None]


def test_the_plan_accounts_the_rows_named_not_the_table(external_model: Path) -> None:
    cm = hyperion.compile(external_model, memory_limit=CAP_BYTES, mode="adaptive")
    (step,) = _row_gather_steps(cm.schedule)
    gather = step.row_gather
    assert (gather.weight, gather.indices, gather.output) == ("table", "ids", "rows")
    assert (gather.rows, gather.row_bytes, gather.read_bytes) == (ROWS, WIDTH * 4, 64 * WIDTH * 4)
    assert cm.schedule.mode == "memory_opt" and cm.schedule.peak_bytes <= CAP_BYTES
    segment = cm.schedule.segments[step.segment]
    assert segment.first_step == segment.last_step == step.index and segment.fed_weights == ()
    # Without reading rows the table alone is more than the cap: refused.
    with pytest.raises(hyperion.MemoryLimitError):
        hyperion.compile(external_model, memory_limit=CAP_BYTES, mode="normal")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(-ROWS, ROWS - 1), min_size=64, max_size=64))
def test_outputs_equal_onnxruntime_for_repeated_and_negative_indices(external_model: Path, ids: list[int]) -> None:
    feeds = {"ids": np.array(ids, np.int64).reshape(2, 32)}
    cm = _compiled(external_model)
    np.testing.assert_array_equal(cm.run(feeds)["y"], reference_outputs(external_model, feeds)["y"])


_COMPILED: dict[Path, hyperion.CompiledModel] = {}


def _compiled(model: Path) -> hyperion.CompiledModel:
    if model not in _COMPILED:  # one plan for every hypothesis example
        _COMPILED[model] = hyperion.compile(model, memory_limit=CAP_BYTES, mode="memory_opt")
    return _COMPILED[model]


def test_adjacent_and_repeated_rows_read_once_each(external_model: Path) -> None:
    ids = np.array([[5, 6, 7, 7, -1, 4095, 0, 1] * 4] * 2, np.int64)
    cm = hyperion.compile(external_model, memory_limit=CAP_BYTES, mode="memory_opt")
    np.testing.assert_array_equal(cm.run({"ids": ids})["y"], reference_outputs(external_model, {"ids": ids})["y"])
    assert row_runs(np.array([0, 1, 5, 6, 7, 4095])) == [(0, 2), (5, 3), (4095, 1)]
    assert row_runs(np.array([], np.int64)) == []


def test_an_index_out_of_range_is_an_error_as_in_onnxruntime(external_model: Path) -> None:
    ids = np.zeros((2, 32), np.int64)
    ids[1, 3] = ROWS
    cm = hyperion.compile(external_model, memory_limit=CAP_BYTES, mode="memory_opt")
    with pytest.raises(RuntimeExecutionError, match=r"'lookup'.*'ids'.*idx=4096.*\[-4096,4095\]"):
        cm.run({"ids": ids})
    with pytest.raises(Exception, match="out of"):  # onnxruntime refuses it too
        reference_outputs(external_model, {"ids": ids})


def test_embedded_weights_of_an_in_memory_model_are_read_by_rows_too() -> None:
    model = gather_model(ROWS, WIDTH, [7])
    ids = np.array([3, -3, 3, 0, 4095, 17, 18], np.int64)
    cm = hyperion.compile(model.SerializeToString(), memory_limit=CAP_BYTES, mode="memory_opt")
    assert len(_row_gather_steps(cm.schedule)) == 1
    np.testing.assert_array_equal(cm.run({"ids": ids})["y"],
                                  reference_outputs(model.SerializeToString(), {"ids": ids})["y"])


def test_a_saved_schedule_keeps_its_row_gathers(external_model: Path, tmp_path: Path) -> None:
    cm = hyperion.compile(external_model, memory_limit=CAP_BYTES, mode="memory_opt")
    path = cm.schedule.save(tmp_path / "gather.schedule.json")
    loaded = hyperion.load(external_model, path)
    assert _row_gather_steps(loaded.schedule) == _row_gather_steps(cm.schedule)
    ids = np.arange(64, dtype=np.int64).reshape(2, 32) * 61
    np.testing.assert_array_equal(loaded.run({"ids": ids})["y"], reference_outputs(external_model, {"ids": ids})["y"])


def test_an_edited_row_gather_reading_past_its_table_is_refused(external_model: Path, tmp_path: Path) -> None:
    cm = hyperion.compile(external_model, memory_limit=CAP_BYTES, mode="memory_opt")
    data = cm.schedule.to_dict()
    step = next(s for s in data["steps"] if s["row_gather"] is not None)
    step["row_gather"]["rows"] *= 2
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(hyperion.ScheduleError, match="row_gather"):
        hyperion.load(external_model, path)


def _tiling(model: onnx.ModelProto, mode: str) -> Program:
    from hyperion.frontend import import_model, load_source

    program = Program(import_model(load_source(model)).graph, mode=hyperion.ExecutionMode(mode))
    build_pipeline(program.mode)(program)
    return program


def test_no_row_gather_where_the_table_is_read_whole_anyway() -> None:
    tied = _tiling(gather_model(ROWS, WIDTH, [8], tied_matmul=True), "memory_opt")
    assert tied.tiling is not None and not tied.tiling.row_gathers      # a MatMul reads the whole table
    normal = _tiling(gather_model(ROWS, WIDTH, [8]), "normal")
    assert normal.tiling is not None and not normal.tiling.row_gathers  # every weight is resident anyway
    small = _tiling(gather_model(64, WIDTH, [8]), "memory_opt")
    assert small.tiling is not None and not small.tiling.row_gathers    # 24 KiB: read whole
    lean = _tiling(gather_model(ROWS, WIDTH, [8]), "memory_opt")
    assert lean.tiling is not None and set(lean.tiling.row_gathers) == {"lookup"}
    assert lean.graph.tensors["table"].nbytes == 8 * WIDTH * 4


# -- the real process --------------------------------------------------------------------
BIG_ROWS, BIG_WIDTH = 34_000, 768      # a 104 MB float32 table, as an embedding's
RSS_ALLOWANCE_BYTES = 16 * 2**20
_BASELINE = """
from hyperion.tools.rss import peak_rss_bytes
import hyperion, onnxruntime
print(peak_rss_bytes())
"""
_RUN = """
import json, sys
import numpy as np
import hyperion
from hyperion.tools.rss import peak_rss_bytes
cm = hyperion.compile(sys.argv[1], memory_limit=int(sys.argv[2]), mode="memory_opt")
ids = np.random.default_rng(3).integers(-34_000, 34_000, (1, 128))
for _ in range(2):
    y = cm.run({"ids": ids})["y"]
np.save(sys.argv[3], y)
print(json.dumps({"rss": peak_rss_bytes(), "peak_bytes": cm.schedule.peak_bytes}))
"""



@pytest.mark.slow
def test_128_rows_of_a_100_mb_table_cost_far_less_rss_than_the_table(tmp_path: Path) -> None:
    # The Gather alone: the process builds no onnxruntime session, whose thread pools and
    # kernels (about 10 MiB) would blur what reading the rows costs.
    model = save_external(gather_model(BIG_ROWS, BIG_WIDTH, [1, 128], shift=False), tmp_path / "embedding.onnx")
    assert (tmp_path / "embedding.onnx.data").stat().st_size >= 100 * 10**6
    baseline = int(run_python(_BASELINE))
    report = json.loads(run_python(_RUN, str(model), str(4 * 2**20), str(tmp_path / "y.npy")))
    above = report["rss"] - baseline
    print(f"\npeak RSS {above / 2**20:.1f} MiB above the import baseline; accounted {report['peak_bytes']} bytes")
    assert report["peak_bytes"] <= 4 * 2**20
    assert above <= RSS_ALLOWANCE_BYTES
    ids = np.random.default_rng(3).integers(-34_000, 34_000, (1, 128))
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), reference_outputs(model, {"ids": ids})["y"])
