"""Data-dependent sizes under a cap (docs/dynamic_shapes.md): every construct in a model of
its own (fixtures/dynamic_shapes.py), compiled under a cap at which its upper bounds fit
(planned whole, tensors marked ``upper_bound``) and one at which they do not or no rule
bounds them (the prefix planned, the rest re-planned at run time). Outputs equal plain
onnxruntime's bit for bit, the accounted peak stays under the cap, a second run with the
same sizes plans nothing, and a size observed too large for the cap is an
ObservedSizeError naming the tensor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx.parser
import onnxruntime as ort
import pytest

import hyperion
from fixtures.dynamic_shapes import BUILDERS, dynamic_feeds, nonzero
from hyperion.runtime.trace import ACCOUNTED_COUNTER, NODES_TRACK, RUN_TRACK
from hyperion.schedule import Observe, Schedule
from hyperion.tools.cli import main
from hyperion.units import parse_size
from tests.conftest import REPO, run_python
from tests.test_looking import check_trace_events
from tests.test_rss import _PEAK, ALLOWANCE_BYTES, BASELINE

# name -> (a cap at which the bounds fit: None when no rule bounds every size, a cap at
# which the model is re-planned, the tensor a too-large observation is refused for: None
# when the fixture's sizes cannot grow past the re-planned cap).
CASES: dict[str, tuple[str | None, str, str | None]] = {
    "reshape_chain": (None, "16MB", "y"),
    "nonzero": ("30MB", "10MB", "idx"),
    "nonzero_gather": (None, "10MB", "idx"),
    "if_branches": ("2MB", "300KB", "r"),
    "loop_runtime_trips": (None, "16MB", "rows"),
    "topk": ("2MB", "700KB", "i"),
    "non_max_suppression": ("1MB", "200KB", "sel"),
    "sequence_ops": ("1MB", "1MB", None),
    "zipmap": ("1MB", "1MB", None),
    "range_from_data": (None, "16MB", "r"),
}
BUILD_ARGS: dict[str, tuple[int, ...]] = {"non_max_suppression": (2000, 4, 2000)}


def _model(name: str) -> Any:
    return BUILDERS[name](*BUILD_ARGS.get(name, ()))


def _reference(model: Any, feeds: dict[str, np.ndarray]) -> list[Any]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_same(ours: dict[str, Any], reference: list[Any]) -> None:
    assert len(ours) == len(reference)
    for got, want in zip(ours.values(), reference, strict=True):
        if isinstance(want, np.ndarray):
            assert isinstance(got, np.ndarray) and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        else:  # sequences of maps (ZipMap), as onnxruntime returns them
            assert type(got) is type(want) and got == want


@pytest.mark.parametrize("name", [n for n, (bounded, _, _) in CASES.items() if bounded is not None])
def test_bounded_sizes_plan_the_whole_model_when_they_fit(name: str) -> None:
    model, cap = _model(name), CASES[name][0]
    assert cap is not None
    cm = hyperion.compile(model, memory_limit=cap)
    assert cm.schedule.replan is None and cm.replans is None
    bounded = [t for t in cm.schedule.tensors.values() if t.upper_bound]
    assert bounded and all(t.bytes is not None for t in bounded)
    for large in (False, True):
        feeds = dynamic_feeds(name, large=large)
        _assert_same(cm.run(feeds), _reference(model, feeds))
        assert cm.stats.peak_bytes <= parse_size(cap)


@pytest.mark.parametrize("name", list(CASES))
def test_replanned_at_run_time_once_per_observed_signature(name: str) -> None:
    model, (bounded_cap, cap, _) = _model(name), CASES[name]
    cm = hyperion.compile(model, memory_limit=cap)
    replan = cm.schedule.replan
    if bounded_cap is not None and parse_size(bounded_cap) <= parse_size(cap):
        assert replan is None  # the bounds fit this cap too
        return
    assert replan is not None and replan.points and replan.reason
    feeds = dynamic_feeds(name)
    reference = _reference(model, feeds)
    for run in range(2):
        _assert_same(cm.run(feeds), reference)
        assert cm.stats.peak_bytes <= parse_size(cap)
        stats = cm.replans
        planned = 1 if replan.suffix_nodes else 0  # TopK's outputs are the model's: no rest to plan
        assert stats is not None and stats.plans_made == planned
        assert stats.last_run_plans == (planned if run == 0 else 0)


@pytest.mark.parametrize("name", [n for n, (_, _, tensor) in CASES.items() if tensor is not None])
def test_an_observed_size_too_large_for_the_cap_names_the_tensor(name: str) -> None:
    model, (_, cap, tensor) = _model(name), CASES[name]
    cm = hyperion.compile(model, memory_limit=cap)
    with pytest.raises(hyperion.ObservedSizeError) as refused:
        cm.run(dynamic_feeds(name, large=True))
    error = refused.value
    assert isinstance(error, hyperion.MemoryLimitError)
    assert error.tensor == tensor and f"{tensor!r}" in str(error)
    assert error.memory_limit == parse_size(cap) and error.size_bytes > 0
    # The refusal is about this input: a smaller one still runs under the same plan.
    feeds = dynamic_feeds(name)
    _assert_same(cm.run(feeds), _reference(model, feeds))


def test_a_new_observed_size_is_planned_once_and_kept() -> None:
    model = _model("reshape_chain")
    cm = hyperion.compile(model, memory_limit="16MB")
    for rows in (64, 32, 64, 32):
        feeds = {"x": dynamic_feeds("reshape_chain")["x"], "rows": np.array([rows])}
        _assert_same(cm.run(feeds), _reference(model, feeds))
    assert cm.replans is not None and cm.replans.plans_made == 2 and cm.replans.last_run_plans == 0


def test_a_saved_replanned_schedule_loads_and_plans_the_rest_on_its_first_run(tmp_path: Path) -> None:
    model = _model("nonzero_gather")
    path = tmp_path / "nonzero_gather.onnx"
    path.write_bytes(model.SerializeToString())
    compiled = hyperion.compile(path, memory_limit="10MB")
    saved = compiled.schedule.save(tmp_path / "s.json")
    data = json.loads(saved.read_text())
    assert {p["observe"] for p in data["replan"]["points"]} == {"shape", "value"}
    assert Schedule.load(saved) == compiled.schedule
    loaded = hyperion.load(path, saved)
    assert not loaded.imported
    feeds = dynamic_feeds("nonzero_gather")
    _assert_same(loaded.run(feeds), _reference(model, feeds))
    _assert_same(loaded.run(feeds), _reference(model, feeds))
    assert loaded.replans is not None and loaded.replans.plans_made == 1
    assert loaded.stats.peak_bytes <= parse_size("10MB")


def test_the_prefix_counts_a_bound_that_fits_and_nothing_for_one_that_does_not() -> None:
    fits = hyperion.compile(_model("nonzero_gather"), memory_limit="30MB").schedule
    does_not = hyperion.compile(_model("nonzero_gather"), memory_limit="10MB").schedule
    assert fits.replan is not None and does_not.replan is not None
    idx = {p.tensor: p for p in fits.replan.points}["idx"]
    assert idx.observe is Observe.SHAPE and idx.accounted_bytes == 8 * (1 << 20) and fits.tensors["idx"].upper_bound
    assert {p.tensor: p for p in does_not.replan.points}["idx"].accounted_bytes == 0


def test_without_a_cap_nothing_changes() -> None:
    cm = hyperion.compile(_model("reshape_chain"))
    assert cm.schedule.replan is None and cm.replans is None


RSS_N = 1 << 23          # a 32 MiB input; a quarter of it non-zero: 16 MiB of indices (bounded by 64 MiB)
RSS_CAP = 96 * 2**20     # the bounds do not fit: the rest is re-planned from the observed size
RSS_RUN = _PEAK + """
import json, sys
import numpy as np
import onnx.parser
import hyperion
from fixtures.dynamic_shapes import nonzero
x = np.zeros(int(sys.argv[1]), np.float32)
x[::4] = 3.0
cm = hyperion.compile(nonzero(int(sys.argv[1])), memory_limit=int(sys.argv[2]))
for _ in range(2):
    y = cm.run({"x": x})["y"]
np.save(sys.argv[3], y)
print(json.dumps({"rss": peak_rss_bytes(), "peak": cm.stats.peak_bytes, "plans": cm.replans.plans_made}))
"""


@pytest.mark.slow
def test_peak_rss_of_a_replanned_model_stays_under_the_cap(tmp_path: Path) -> None:
    baseline = int(run_python(BASELINE))
    out = tmp_path / "y.npy"
    done = subprocess.run([sys.executable, "-c", RSS_RUN, str(RSS_N), str(RSS_CAP), str(out)], capture_output=True,
                          text=True, check=False, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS above baseline {(report['rss'] - baseline) / 2**20:.1f} MiB, cap {RSS_CAP / 2**20:.0f} MiB, "
          f"accounted {report['peak'] / 2**20:.1f} MiB")
    assert report["plans"] == 1 and report["peak"] <= RSS_CAP
    assert report["rss"] - baseline <= RSS_CAP + ALLOWANCE_BYTES
    x = np.zeros(RSS_N, np.float32)
    x[::4] = 3.0
    np.testing.assert_array_equal(np.load(out), _reference(nonzero(RSS_N), {"x": x})[0])


# -- traces of re-planned runs (docs/looking.md) ------------------------------------------
def _spans(tracks: dict[str, list[dict]], cat: str) -> list[dict]:
    return sorted((e for e in tracks[RUN_TRACK] if e["cat"] == cat), key=lambda e: e["ts"])


def _inside(inner: dict, outer: dict) -> bool:
    return outer["ts"] - 1e-3 <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + 1e-3


def test_a_traced_replanned_run_shows_the_prefix_the_replan_and_the_rest(tmp_path: Path) -> None:
    model = _model("nonzero")
    cm = hyperion.compile(model, memory_limit="10MB")
    small, other = dynamic_feeds("nonzero"), {"x": np.eye(1, 1 << 20, 7, dtype=np.float32)[0]}
    with cm.tracing(tmp_path / "runs.json"):
        outputs = [cm.run(feeds) for feeds in (small, small, other)]   # plans the rest, reuses it, plans another
    for ours, feeds in zip(outputs, (small, small, other), strict=True):
        _assert_same(ours, _reference(model, feeds))
    trace = json.loads((tmp_path / "runs.json").read_text())
    tracks = check_trace_events(trace)
    runs, plans, replans = _spans(tracks, "run"), _spans(tracks, "plan"), _spans(tracks, "replan")
    assert len(runs) == 3 and all(e["args"]["replanned"] for e in runs)
    assert [e["name"] for e in plans] == ["prefix", "rest 1", "prefix", "rest 1", "prefix", "rest 2"]
    decisions = [e for e in replans if e["name"] == "re-plan"]
    assert [e["args"]["cache"] for e in decisions] == ["miss", "hit", "miss"]
    for number, run in enumerate(runs):  # in each run: the prefix, then the re-plan, then the rest
        prefix, rest = plans[2 * number], plans[2 * number + 1]
        decision = decisions[number]
        assert all(_inside(span, run) for span in (prefix, decision, rest))
        assert prefix["ts"] + prefix["dur"] <= decision["ts"] + 1e-3
        assert decision["ts"] + decision["dur"] <= rest["ts"] + 1e-3
        # A miss imports and plans the rest inside the re-plan span; a hit does neither.
        steps = [e["name"] for e in replans if e is not decision and _inside(e, decision)]
        assert steps == ([] if decision["args"]["cache"] == "hit" else ["import the rest", "plan the rest"])
    # Each plan's segments carry its name, and onnxruntime's nodes their plan: NonZero in the
    # prefix, the rest's Mul in the rest.
    segments = _spans(tracks, "segment")
    assert [e["name"] for e in segments] == ["prefix: segment 0", "rest 1: segment 0"] * 2 + [
        "prefix: segment 0", "rest 2: segment 0"]
    nodes = {(e["args"]["op"], e["args"]["plan"]) for e in tracks[NODES_TRACK] if e["cat"] == "node"}
    assert {("NonZero", "prefix"), ("Mul", "rest 1"), ("Mul", "rest 2")} <= nodes
    assert trace["otherData"]["plans"] == ["prefix", "rest 1", "rest 2"]
    accounted = [e["args"]["bytes"] for e in trace["traceEvents"] if e["name"] == ACCOUNTED_COUNTER]
    assert len(accounted) >= 6 and max(accounted) <= parse_size("10MB")
    # The model's stats are the last traced run's; it runs untraced as before.
    assert runs[-1]["dur"] / 1e3 == pytest.approx(cm.stats.total_ms, rel=0.1)
    _assert_same(cm.run(small), _reference(model, small))
    assert cm.replans is not None and cm.replans.plans_made == 2


def test_hyperion_run_traces_a_replanned_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "range.onnx"
    path.write_bytes(_model("range_from_data").SerializeToString())
    np.save(tmp_path / "x.npy", dynamic_feeds("range_from_data")["x"])
    assert main(["run", str(path), "--memory-limit", "16MB", "--input", f"x={tmp_path / 'x.npy'}",
                 "--trace", str(tmp_path / "run.json"), "--check"]) == 0
    assert "trace written" in capsys.readouterr().out
    tracks = check_trace_events(json.loads((tmp_path / "run.json").read_text()))
    assert [e["name"] for e in _spans(tracks, "plan")] == ["prefix", "rest 1"]
    assert [e["args"]["cache"] for e in _spans(tracks, "replan") if e["name"] == "re-plan"] == ["miss"]


NESTED = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[4] x) => (float[?] y) {
    n = ReduceMax <keepdims = 0> (x)
    zero = Constant <value = int64 {0}> ()
    one = Constant <value = int64 {1}> ()
    r = Range(zero, n, one)
    s = ReduceSum <keepdims = 0> (r)
    q = Range(zero, s, one)
    f = Cast <to = 1> (q)
    y = Sqrt(f)
}"""


def test_the_trace_of_a_rest_that_is_itself_replanned_nests_its_plans(tmp_path: Path) -> None:
    model = onnx.parser.parse_model(NESTED)   # r's length is n's value; q's is the value of r's sum
    cm = hyperion.compile(model, memory_limit="16MB")
    feeds = {"x": np.array([3, 9, 20, 1])}
    with cm.tracing(tmp_path / "nested.json") as tracing:
        _assert_same(cm.run(feeds), _reference(model, feeds))
    assert tracing.trace is not None
    tracks = check_trace_events(tracing.trace)
    spans = sorted(_spans(tracks, "plan") + _spans(tracks, "replan"), key=lambda e: (e["ts"], -e["dur"]))
    assert [(e["name"], e["args"].get("cache")) for e in spans] == [
        ("prefix", None), ("re-plan", "miss"), ("import the rest", None), ("plan the rest", None),
        ("rest 1", None), ("rest 1/prefix", None), ("rest 1/re-plan", "miss"), ("rest 1/import the rest", None),
        ("rest 1/plan the rest", None), ("rest 1/rest 1", None)]
    outer, inner = {e["name"]: e for e in _spans(tracks, "plan")}["rest 1"], _spans(tracks, "plan")[-1]
    assert inner["name"] == "rest 1/rest 1" and _inside(inner, outer)
    assert tracing.trace["otherData"]["plans"] == ["prefix", "rest 1/prefix", "rest 1/rest 1"]
