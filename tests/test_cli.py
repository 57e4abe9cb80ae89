"""The command line: every subcommand once, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hyperion.tools.cli import EXIT_MISMATCH, _check_against_onnxruntime, main
from tests.conftest import example_feeds, fixture_path, reference_outputs


def test_compile_writes_a_schedule_and_inspect_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "unet.schedule.json"
    assert main(["compile", str(fixture_path("unet")), "--memory-limit", "300KB", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["memory_limit"] == 300_000 and data["peak_bytes"] <= 300_000
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "concat2" in text and "residual" in text and "segment" in text


def test_inspect_a_model_directly(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(fixture_path("transformer_block"))]) == 0
    text = capsys.readouterr().out
    assert "attention" in text and "softmax" in text


def test_run_with_check_and_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = main(["run", str(fixture_path("mlp")), "--memory-limit", "200KB", "--input", f"x={tmp_path / 'x.npy'}",
                 "--output-dir", str(tmp_path / "out"), "--check"])
    assert code == 0
    assert "outputs match" in capsys.readouterr().out
    assert np.load(tmp_path / "out" / "y.npy").shape == (1, 10)


def test_run_generates_missing_inputs_with_a_printed_seed(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(fixture_path("dynamic_dims")), "--input-shape", "input_ids=2x5", "--check"]) == 0
    text = capsys.readouterr().out
    assert "--seed" in text and "outputs match" in text and "logits: float32[2, 4]" in text


def test_run_from_a_saved_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    schedule = tmp_path / "s.json"
    assert main(["compile", str(fixture_path("resnet_block")), "--memory-limit", "48KB", "-o", str(schedule)]) == 0
    assert main(["run", str(fixture_path("resnet_block")), "--schedule", str(schedule), "--seed", "1",
                 "--check"]) == 0
    assert "outputs match" in capsys.readouterr().out


@pytest.mark.parametrize("schedule", [False, True])
def test_run_unpacked_checks_against_onnxruntime_running_unpacked(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  schedule: bool) -> None:
    model = fixture_path("external_data")
    given = ["--schedule", str(tmp_path / "s.json")] if schedule else ["--memory-limit", "700KB"]
    if schedule:
        assert main(["compile", str(model), "--memory-limit", "700KB", "-o", str(tmp_path / "s.json")]) == 0
    assert main(["run", str(model), *given, "--seed", "2", "--no-prepack", "--check"]) == 0
    text = capsys.readouterr().out
    assert "mode memory_opt" in text and "outputs match plain onnxruntime (max abs difference 0)" in text


def test_check_tolerates_rounding_at_the_outputs_scale_and_nothing_more(capsys: pytest.CaptureFixture) -> None:
    model = fixture_path("demo")
    feeds = example_feeds("demo")
    want = reference_outputs(model, feeds)
    name, values = next(iter(want.items()))
    scale = float(np.abs(values).max())
    rounded = {**want, name: values + np.float32(2e-6 * scale)}      # another summation order
    assert _check_against_onnxruntime(model, feeds, rounded, prepack_weights=True) == 0
    wrong = {**want, name: values + np.float32(1e-3 * scale)}
    assert _check_against_onnxruntime(model, feeds, wrong, prepack_weights=True) == EXIT_MISMATCH
    assert "MISMATCH" in capsys.readouterr().out


def test_plot_and_exports(tmp_path: Path) -> None:
    schedule = tmp_path / "s.json"
    assert main(["compile", str(fixture_path("demo")), "--memory-limit", "2MB", "--input-shape", "image=1x3x64x64",
                 "-o", str(schedule)]) == 0
    assert main(["plot", str(schedule), "-o", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["export", str(schedule), "--format", "dot", "-o", str(tmp_path / "g.dot")]) == 0
    assert (tmp_path / "g.dot").read_text().startswith("digraph hyperion {")
    assert main(["export", str(schedule), "--format", "trace", "-o", str(tmp_path / "t.json")]) == 0
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert {e["ph"] for e in events} == {"X", "C", "M"}   # M: the process name says "planned, not measured"


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.count("outputs match plain onnxruntime") == 2
    assert (tmp_path / "demo.capped.schedule.json").is_file()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyperion.tools.cli", *args], capture_output=True, text=True,
                          check=False)


@pytest.mark.parametrize(("args", "needle", "code"), [
    (["compile", "does-not-exist.onnx"], "no such model file", 4),
    (["compile", str(fixture_path("mlp")), "--memory-limit", "1KB", "--mode", "normal"], "cannot be met", 9),
    (["run", str(fixture_path("mlp")), "--input", "nope=x.npy"], "no input 'nope'", 8),
])
def test_errors_print_one_line_and_exit_non_zero(args: list[str], needle: str, code: int) -> None:
    done = _cli(*args)
    assert done.returncode == code
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hyperion: error:") and needle in lines[0]
    assert "Traceback" not in done.stderr


def test_bad_size_is_a_usage_error() -> None:
    done = _cli("compile", str(fixture_path("mlp")), "--memory-limit", "lots")
    assert done.returncode == 2 and "cannot read 'lots' as a size" in done.stderr


def test_generated_inputs_for_scalar_bool_and_int_inputs(capsys: pytest.CaptureFixture) -> None:
    # control_flow has a scalar bool condition and a scalar int64 trip count.
    assert main(["run", str(fixture_path("control_flow")), "--seed", "4", "--check"]) == 0
    assert "outputs match" in capsys.readouterr().out


@pytest.mark.parametrize("terminal", [True, False])
def test_run_shows_progress_on_a_terminal_only(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                               terminal: bool) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert main(["run", str(fixture_path("demo")), "--memory-limit", "1.5MB", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert ("running demo.onnx" in err and "segment" in err) == terminal


@pytest.mark.parametrize(("extra", "capped_mode"), [([], "memory_opt"), (["--no-prepack", "--no-rss"], "normal")])
def test_bench_prints_a_row_per_cap(capsys: pytest.CaptureFixture, extra: list[str], capped_mode: str) -> None:
    assert main(["bench", str(fixture_path("mlp")), "--memory-limit", "150KB", "--repeats", "2", *extra]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| mlp ")]
    # Unpacked, the plan holds each weight once, not packed beside its original: normal fits.
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("none", "normal"), ("146.5 KiB", capped_mode)]
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0                        # both latencies measured
        assert (row[8].strip() == "-") == ("--no-rss" in extra)               # RSS only when asked
