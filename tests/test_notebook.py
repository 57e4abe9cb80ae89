"""Schedules and compiled models show themselves: one repr line, and HTML for Jupyter."""

from __future__ import annotations

import base64
import importlib.util
from html.parser import HTMLParser

import pytest

import hyperion
from tests.conftest import example_feeds, fixture_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = "data:image/png;base64,"


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _Collector:
    parser = _Collector()
    parser.feed(html)
    parser.close()
    return parser


def _images(parsed: _Collector) -> list[bytes]:
    sources = [attrs.get("src") or "" for tag, attrs in parsed.tags if tag == "img"]
    return [base64.b64decode(src.removeprefix(DATA_URI)) for src in sources if src.startswith(DATA_URI)]


def test_schedule_repr_is_one_readable_line() -> None:
    cm = hyperion.compile(fixture_path("demo"), memory_limit="1.5MiB", mode="memory_opt",
                          input_shapes={"image": [1, 3, 64, 64]})
    line = repr(cm.schedule)
    assert "\n" not in line
    steps, segments = len(cm.schedule.steps), len(cm.schedule.segments)
    assert line.startswith(f"<Schedule demo.onnx memory_opt: {steps} steps, {segments} segments, peak ")
    assert line.endswith(", cap 1.5 MiB>")
    model_line = repr(cm)
    assert "\n" not in model_line and model_line.startswith("<CompiledModel demo.onnx memory_opt (cap 1.5 MiB)")


def test_compiled_model_repr_before_the_first_run() -> None:
    cm = hyperion.compile(fixture_path("dynamic_dims"))
    assert repr(cm) == ("<CompiledModel dynamic_dims.onnx adaptive (cap none): not planned yet, "
                        "input shapes come with the first run>")
    assert "not planned yet" in "".join(_parse(cm._repr_html_()).text)
    cm.run(example_feeds("dynamic_dims"), outputs=["logits"])
    assert repr(cm).endswith(", outputs logits>")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs the plot extra")
def test_html_has_the_summary_table_and_the_timeline() -> None:
    cm = hyperion.compile(fixture_path("resnet_block"), memory_limit="1MB")
    for html in (cm.schedule._repr_html_(), cm._repr_html_()):
        parsed = _parse(html)
        tags = [tag for tag, _ in parsed.tags]
        assert "table" in tags and tags.count("tr") >= 7
        text = "".join(parsed.text)
        assert "peak" in text and "memory limit" in text and "resnet_block.onnx" in text
        images = _images(parsed)
        assert len(images) == 1 and images[0].startswith(PNG_MAGIC)
    assert "<img" in hyperion.InferenceSession(str(fixture_path("mlp")))._repr_html_()


def test_html_without_matplotlib_is_the_table_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    schedule = hyperion.compile(fixture_path("mlp")).schedule
    parsed = _parse(schedule._repr_html_())
    assert not [tag for tag, _ in parsed.tags if tag == "img"]
    assert "table" in [tag for tag, _ in parsed.tags]
    assert "hyperion[plot]" in "".join(parsed.text)


def test_core_does_not_import_tools() -> None:
    import subprocess
    import sys

    code = ("import sys, hyperion; hyperion.compile('fixtures/mlp.onnx').schedule; "
            "print(sorted(m for m in sys.modules if m.startswith('hyperion.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=fixture_path("mlp").parents[1])
    assert out.stdout.strip() == "[]"
