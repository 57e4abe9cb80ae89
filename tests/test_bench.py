"""hyperion bench with a cap given as a share of plain onnxruntime's peak RSS (``--memory-limit 50%``)."""

from __future__ import annotations

import numpy as np
import pytest

from hyperion.errors import OptionError
from hyperion.tools import bench
from hyperion.tools.bench import OrtFraction, parse_limit
from hyperion.tools.cli import main
from tests.conftest import fixture_path


def test_a_percentage_is_a_share_of_onnxruntime_and_a_size_stays_a_size() -> None:
    assert parse_limit("50%") == OrtFraction(0.5)
    assert parse_limit(" 12.5% ") == OrtFraction(0.125)
    assert parse_limit("150KB") == 150_000
    for bad in ("%", "0%", "-5%", "half%", "inf%"):
        with pytest.raises(OptionError, match="percentage"):
            parse_limit(bad)


def test_bench_caps_at_the_share_of_the_rss_it_measured(capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[str] = []

    def ort_rss(model, feeds) -> int:
        measured.append(model.name)
        return 4 * 2**20

    monkeypatch.setattr(bench, "ort_rss_bytes", ort_rss)
    assert main(["bench", str(fixture_path("mlp")), "--memory-limit", "50%", "--memory-limit", "25%",
                 "--repeats", "2", "--no-rss"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| mlp ")]
    assert measured == ["mlp.onnx"]                    # once, whatever the number of shares
    assert [r[1].strip() for r in rows] == ["none", "2.0 MiB (50% of onnxruntime)", "1.0 MiB (25% of onnxruntime)"]


def test_onnxruntime_rss_is_measured_in_a_fresh_process() -> None:
    import onnx

    model = fixture_path("mlp")
    graph_input = onnx.load(model).graph.input[0]
    dims = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
    feeds = {graph_input.name: np.ones(dims, dtype=np.float32)}
    rss = bench.ort_rss_bytes(model, feeds)
    # Above the import-only baseline: a session and its run cost something, far from a gigabyte.
    assert 0 < rss < 2**30
    rows = bench.bench_model(model, [OrtFraction(0.5)], repeats=2, measure_rss=False)
    assert rows[0].ort_fraction == 0.5 and 0 < rows[0].memory_limit < rss
