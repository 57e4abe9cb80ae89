"""Looking at a run: measured traces, the memory timeline, inspect --json/--at, DOT, progress."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

import hyperion
from fixtures import FIXTURE_NAMES, example_feeds, fixture_path
from hyperion.runtime.trace import (
    ACCOUNTED_COUNTER,
    NODES_TRACK,
    PREFETCH_TRACK,
    RSS_COUNTER,
    RUN_TRACK,
    SESSION_WEIGHTS_COUNTER,
    SESSIONS_TRACK,
)
from hyperion.schedule import Schedule
from hyperion.tools.cli import main
from hyperion.tools.report import ROLES, alive_at, inspect_data, role_bytes, to_dot
from tests.conftest import REPO


def _demo(limit: str | None, batch: int = 1, prepack_weights: bool | None = None) -> hyperion.CompiledModel:
    return hyperion.compile(fixture_path("demo"), memory_limit=limit, input_shapes={"image": [batch, 3, 64, 64]},
                            prepack_weights=prepack_weights)


# -- the trace ---------------------------------------------------------------------------
def check_trace_events(trace: dict) -> dict[str, list[dict]]:
    """Assert ``trace`` is valid trace-event JSON; its complete events by track name."""
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    by_track: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        for key in ("ph", "ts", "pid", "tid", "name"):
            assert key in event, (key, event)
        assert isinstance(event["ts"], int | float) and isinstance(event["pid"], int)
        if event["ph"] == "C":
            assert event["args"] and all(isinstance(v, int | float) for v in event["args"].values()), event
        elif event["ph"] == "X":
            assert event["dur"] >= 0
            by_track[names[event["tid"]]].append(event)
        else:
            assert event["ph"] in ("M", "i"), event
    for track, spans in by_track.items():   # within a track, spans nest or follow one another
        stack: list[float] = []
        for span in sorted(spans, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1] <= span["ts"] + 1e-3:
                stack.pop()
            end = span["ts"] + span["dur"]
            assert not stack or end <= stack[-1] + 1e-3, f"{track}: {span['name']} overlaps its parent"
            stack.append(end)
    return by_track


def test_trace_of_a_capped_run(tmp_path: Path) -> None:
    cm = _demo("4.5MB", prepack_weights=True)   # packed (Conv weights reordered while built): prefetched on a thread
    assert cm.schedule.mode == "memory_opt" and cm.schedule.prefetch and len(cm.schedule.segments) > 1
    feeds = example_feeds("demo")
    expected = cm.run(feeds)
    outputs = cm.run(feeds, trace=tmp_path / "run.json")
    np.testing.assert_array_equal(outputs["logits"], expected["logits"])
    trace = json.loads((tmp_path / "run.json").read_text())
    assert trace["otherData"]["source"] == "measured"
    tracks = check_trace_events(trace)
    assert {RUN_TRACK, SESSIONS_TRACK, PREFETCH_TRACK, NODES_TRACK} <= set(tracks)
    [run] = [e for e in tracks[RUN_TRACK] if e["cat"] == "run"]
    segments = [e for e in tracks[RUN_TRACK] if e["cat"] == "segment"]
    assert [e["args"]["segment"] for e in segments] == list(range(len(cm.schedule.segments)))
    # The segments account for the run's wall time; the run span is the one the stats report.
    assert sum(e["dur"] for e in segments) == pytest.approx(run["dur"], rel=0.1)
    assert run["dur"] / 1e3 == pytest.approx(cm.stats.total_ms, rel=0.1)
    # Segment 0 is built on the run's thread, the others on the prefetch thread (segment 0 again,
    # for the next run, when the schedule prefetches cyclically); every session is released.
    prefetched = [e["args"]["segment"] for e in tracks[PREFETCH_TRACK] if e["name"].startswith("build session")]
    assert [e["args"]["segment"] for e in tracks[SESSIONS_TRACK] if e["name"].startswith("build")] == [0]
    assert prefetched == list(range(1, len(cm.schedule.segments))) + ([0] if cm.schedule.cyclic_prefetch else [])
    released = [e for e in trace["traceEvents"] if e["ph"] == "i" and e["name"].startswith("release session")]
    assert len(released) == len(prefetched) + 1
    # onnxruntime's per-node times, on the same clock: inside their segment's span.
    nodes = [e for e in tracks[NODES_TRACK] if e["cat"] == "node"]
    assert len(nodes) >= len(cm.schedule.segments) and all(e["args"]["op"] for e in nodes)
    for node in nodes:
        span = segments[node["args"]["segment"]]
        assert span["ts"] - 500 <= node["ts"] and node["ts"] + node["dur"] <= span["ts"] + span["dur"] + 500
    counters = Counter(e["name"] for e in trace["traceEvents"] if e["ph"] == "C")
    assert counters[RSS_COUNTER] >= 2 and counters[ACCOUNTED_COUNTER] >= len(cm.schedule.segments)
    assert counters[SESSION_WEIGHTS_COUNTER] == 2 * len(released)   # each built, then released
    accounted = [e["args"]["bytes"] for e in trace["traceEvents"] if e["name"] == ACCOUNTED_COUNTER]
    assert max(accounted) <= cm.schedule.peak_bytes
    # After the traced run the model runs as before, untraced.
    np.testing.assert_array_equal(cm.run(feeds)["logits"], expected["logits"])


def test_tracing_block_records_every_run_and_kept_sessions_are_built_once(tmp_path: Path) -> None:
    cm = hyperion.compile(fixture_path("demo"), input_shapes={"image": [1, 3, 64, 64]}, whole_model_shortcut=False)
    feeds = example_feeds("demo")
    with cm.tracing(tmp_path / "runs.json"):
        cm.run(feeds)
        cm.run(feeds)
    tracks = check_trace_events(json.loads((tmp_path / "runs.json").read_text()))
    runs = [e for e in tracks[RUN_TRACK] if e["cat"] == "run"]
    assert len(runs) == 2
    builds = [e for e in tracks[SESSIONS_TRACK] if e["name"].startswith("build session")]
    assert len(builds) == len(cm.schedule.segments) and all(b["ts"] < runs[1]["ts"] for b in builds)
    assert len([e for e in tracks[NODES_TRACK] if e["name"].endswith("onnxruntime run")]) == 2 * len(
        cm.schedule.segments)


def test_trace_of_a_whole_model_run_and_a_streaming_run(tmp_path: Path) -> None:
    whole = _demo(None)
    assert whole.schedule.whole_model
    whole.run(example_feeds("demo"), trace=tmp_path / "whole.json")
    tracks = check_trace_events(json.loads((tmp_path / "whole.json").read_text()))
    assert [e["name"] for e in tracks[RUN_TRACK]] == ["run", "segment 0 (whole model)"]
    assert any(e["cat"] == "node" for e in tracks[NODES_TRACK])

    streaming = _demo("3MB", batch=8)
    assert streaming.schedule.mode == "streaming"
    streaming.run(example_feeds("demo", batch=8), trace=tmp_path / "streaming.json")
    tracks = check_trace_events(json.loads((tmp_path / "streaming.json").read_text()))
    chunks = [e for e in tracks[RUN_TRACK] if e["cat"] == "chunk"]
    assert len(chunks) == -(-8 // streaming.schedule.batch_chunk) > 1
    segments = [e for e in tracks[RUN_TRACK] if e["cat"] == "segment"]
    assert len(segments) == len(chunks) * len(streaming.schedule.segments)


def test_no_trace_file_when_the_run_fails(tmp_path: Path) -> None:
    cm = _demo("4.5MB", prepack_weights=True)   # packed (Conv weights reordered while built): prefetched on a thread
    with pytest.raises(hyperion.FeedError):
        cm.run({"image": np.zeros((1, 3, 64, 64), np.float64)}, trace=tmp_path / "run.json")
    assert not (tmp_path / "run.json").exists()


def test_cli_run_trace_and_planned_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(fixture_path("demo")), "--memory-limit", "1.5MB", "--input-shape", "image=1x3x64x64",
                 "--seed", "0", "--trace", str(tmp_path / "run.json")]) == 0
    assert "trace written to" in capsys.readouterr().out
    check_trace_events(json.loads((tmp_path / "run.json").read_text()))
    schedule = tmp_path / "s.json"
    assert main(["compile", str(fixture_path("demo")), "--memory-limit", "1.5MB", "--input-shape",
                 "image=1x3x64x64", "-o", str(schedule)]) == 0
    assert main(["export", str(schedule), "--format", "trace", "-o", str(tmp_path / "planned.json")]) == 0
    planned = json.loads((tmp_path / "planned.json").read_text())
    assert planned["otherData"]["source"] == "planned" and "not measured" in planned["otherData"]["note"]
    assert "not measured" in planned["traceEvents"][0]["args"]["name"]


# -- the memory timeline -------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_roles_sum_to_the_accounted_bytes(name: str) -> None:
    shapes = {k: list(np.shape(v)) for k, v in example_feeds(name).items()}
    uncapped = hyperion.compile(fixture_path(name), input_shapes=shapes)
    plans = [uncapped.schedule]
    try:
        plans.append(hyperion.compile(fixture_path(name), memory_limit=uncapped.schedule.peak_bytes * 3 // 4,
                                      input_shapes=shapes).schedule)
    except hyperion.MemoryLimitError:
        pass
    for schedule in plans:
        layers = role_bytes(schedule)
        for step in schedule.steps:
            assert all(layers[r][step.index] >= 0 for r in ROLES), (schedule.mode, step.index)
            assert sum(layers[r][step.index] for r in ROLES) == step.live_bytes
            tensors = sum(a.bytes for a in alive_at(schedule, step.index) if not a.role.startswith("weights"))
            assert tensors == sum(layers[r][step.index] for r in ROLES[2:5])


def test_plot_png_has_its_size_and_is_not_blank(tmp_path: Path) -> None:
    from matplotlib.image import imread

    cm = _demo("4.5MB", prepack_weights=True)   # packed (Conv weights reordered while built): prefetched on a thread
    cm.schedule.save(tmp_path / "s.json")
    cm.run(example_feeds("demo"), trace=tmp_path / "run.json")
    assert main(["plot", str(tmp_path / "s.json"), "-o", str(tmp_path / "m.png"), "--trace",
                 str(tmp_path / "run.json")]) == 0
    pixels = imread(tmp_path / "m.png")
    assert pixels.shape[:2] == (480, 1100)
    assert pixels[..., :3].std() > 0.05   # not one colour
    # The peak step's area is drawn: its column differs from the background.
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 20


def test_plot_html_lists_tensors_alive_on_hover(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    schedule = _demo("1.5MB").schedule
    from hyperion.tools.plot import plot_memory

    text = plot_memory(schedule, tmp_path / "m.html").read_text()
    peak = max(schedule.steps, key=lambda s: s.live_bytes)
    assert "plotly" in text and f"step {peak.index}: {peak.node}" in text and "memory limit" in text
    assert alive_at(schedule, peak.index)[0].name in text


# -- inspect --------------------------------------------------------------------------------
def test_inspect_json_round_trips_the_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.json"
    _demo("1.5MB").schedule.save(path)
    schedule = Schedule.load(path)
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(json.dumps(inspect_data(schedule)))
    summary = data["summary"]
    assert (summary["peak_bytes"], summary["lower_bound_bytes"], summary["memory_limit_bytes"], summary["mode"],
            summary["mode_reason"], summary["segments"], summary["steps"]) == (
        schedule.peak_bytes, schedule.lower_bound_bytes, schedule.memory_limit, schedule.mode, schedule.mode_reason,
        len(schedule.segments), len(schedule.steps))
    assert summary["edge_kinds"] == dict(Counter(e.kind.value for e in schedule.edges))
    assert schedule.steps[summary["peak_step"]].live_bytes == schedule.peak_bytes
    assert summary["peak_node"] == schedule.steps[summary["peak_step"]].node
    assert summary["smallest_feasible_cap_bytes"] == schedule.optimal_peak_bytes
    for got, step in zip(data["steps"], schedule.steps, strict=True):
        assert (got["node"], got["op"], got["segment"], got["live_bytes"], tuple(got["frees"])) == (
            step.node, step.op_type, step.segment, step.live_bytes, step.frees)
        assert sum(got["bytes_by_role"].values()) == step.live_bytes
    assert [(s["first_step"], s["last_step"], s["peak_bytes"]) for s in data["segments"]] == [
        (s.first_step, s.last_step, s.peak_bytes) for s in schedule.segments]


def test_inspect_at_a_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.json"
    schedule = _demo("1.5MB").schedule
    schedule.save(path)
    peak = max(schedule.steps, key=lambda s: s.live_bytes)
    capsys.readouterr()
    assert main(["inspect", str(path), "--at", str(peak.index), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["node"] == peak.node and data["tensors"]
    assert {t["role"] for t in data["tensors"]} >= {"activations", "weights: running segment's session"}
    assert all(t["bytes"] == schedule.tensors[t["name"]].bytes for t in data["tensors"])
    assert main(["inspect", str(path), "--at", str(peak.index)]) == 0
    text = capsys.readouterr().out
    assert peak.node in text and data["tensors"][0]["name"] in text
    assert main(["inspect", str(path), "--at", str(len(schedule.steps))]) == 2
    assert "--at" in capsys.readouterr().err


# -- DOT ------------------------------------------------------------------------------------
def test_dot_parses_back_with_its_nodes_edges_and_kinds(tmp_path: Path) -> None:
    pydot = pytest.importorskip("pydot")
    import networkx as nx

    schedule = _demo("1.5MB").schedule
    text = to_dot(schedule)
    [graph] = pydot.graph_from_dot_data(text)
    assert len(graph.get_subgraphs()) == len(schedule.segments)
    parsed = nx.nx_pydot.from_pydot(graph)
    assert parsed.number_of_nodes() == len(schedule.steps)
    assert parsed.number_of_edges() == len(schedule.edges)
    kinds = Counter(data["kind"] for _, _, data in parsed.edges(data=True))
    assert kinds == Counter(e.kind.value for e in schedule.edges)
    colours = {data["kind"]: data["color"] for _, _, data in parsed.edges(data=True)}
    assert colours["residual"] != colours["sequential"]
    # Each segment's cluster holds its steps' nodes, labelled with op and live MB.
    for cluster, segment in zip(graph.get_subgraphs(), schedule.segments, strict=True):
        labels = {json.loads(n.get_name()): json.loads(n.get("label")) for n in cluster.get_nodes()
                  if n.get_name() not in ("node", "edge", "graph")}
        assert list(labels) == [schedule.steps[i].node for i in segment.steps]
        for i in segment.steps:
            step = schedule.steps[i]
            assert labels[step.node].endswith(f"{step.op_type} · {step.live_bytes / 1e6:.2f} MB live")
    if shutil.which("dot"):
        (tmp_path / "g.dot").write_text(text)
        done = subprocess.run(["dot", "-Tsvg", str(tmp_path / "g.dot")], capture_output=True, text=True, check=True)
        assert done.stdout.lstrip().startswith("<?xml") and "<svg" in done.stdout


# -- progress -------------------------------------------------------------------------------
RUN_ARGS = ["run", str(fixture_path("demo")), "--memory-limit", "1.5MB", "--input-shape", "image=1x3x64x64",
            "--seed", "0"]


def _under_a_terminal(args: list[str], python: str | None = None) -> str:
    """Standard error of the CLI (or of the ``python`` code) run with a pseudo-terminal as its standard error."""
    leader, follower = pty.openpty()
    command = ["-c", python] if python is not None else ["-m", "hyperion.tools.cli", *args]
    process = subprocess.Popen([sys.executable, *command], stdout=subprocess.DEVNULL,
                               stderr=follower, cwd=REPO, env={**os.environ, "COLUMNS": "100"})
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(leader, 4096)
        except OSError:   # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=60)
    os.close(leader)
    assert process.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_shows_under_a_terminal_only() -> None:
    assert "running demo.onnx" in _under_a_terminal(RUN_ARGS)
    assert "running demo.onnx" not in _under_a_terminal([*RUN_ARGS, "--quiet"])
    piped = subprocess.run([sys.executable, "-m", "hyperion.tools.cli", *RUN_ARGS], capture_output=True, text=True,
                           cwd=REPO, check=True)
    assert piped.stderr == "" and "\x1b[" not in piped.stdout and "\r" not in piped.stdout


def test_work_without_steps_shows_its_time_after_a_delay_and_clears_it() -> None:
    code = ("import time\nfrom hyperion.tools.cli import _working\n"
            "with _working('compiling big.onnx', delay={}):\n    time.sleep(0.5)\n")
    shown = _under_a_terminal([], code.format(0.1))
    assert "compiling big.onnx: 00:00" in shown and shown.endswith("\r")   # the line is cleared
    assert "compiling" not in _under_a_terminal([], code.format(5))          # a short compile shows nothing


def test_a_trace_drawn_as_an_image(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from hyperion.tools.trace_image import main as trace_image

    _demo("3MB", batch=8).run(example_feeds("demo", batch=8), trace=tmp_path / "run.json")
    assert trace_image([str(tmp_path / "t.png"), "--trace", str(tmp_path / "run.json")]) == 0
    pixels = imread(tmp_path / "t.png")
    assert pixels.shape[1] == 1300 and pixels[..., :3].std() > 0.05
