"""How schedules and compiled models show themselves: one ``repr`` line, and Jupyter's HTML.

``Schedule._repr_html_`` and ``CompiledModel._repr_html_`` render the summary of
:func:`hyperion.tools.report.summary` as a table and, when matplotlib is installed
(the ``plot`` extra), the memory timeline of :func:`hyperion.tools.plot.plot_memory`
inline as a base64 PNG. The core imports this module only when asked to display
something.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from hyperion.errors import HyperionError, OptionError
from hyperion.schedule import Schedule
from hyperion.units import format_size

if TYPE_CHECKING:
    from hyperion.api import CompiledModel

SUMMARY_KEY_WIDTH = 12  # report.summary pads its keys to this width, then one space


def _model_name(path: str | None) -> str:
    return Path(path).name if path else "<in-memory>"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _cap(limit: int | None) -> str:
    return format_size(limit) if limit else "none"


def schedule_repr(schedule: Schedule) -> str:
    """``<Schedule demo.onnx memory_opt: 42 steps, 5 segments, peak 1.3 MiB, cap 1.5 MiB>``."""
    return (f"<Schedule {_model_name(schedule.model.path)} {schedule.mode}: "
            f"{_plural(len(schedule.steps), 'step')}, {_plural(len(schedule.segments), 'segment')}, "
            f"peak {format_size(schedule.peak_bytes)}, cap {_cap(schedule.memory_limit)}>")


def compiled_model_repr(model: CompiledModel) -> str:
    """``<CompiledModel demo.onnx adaptive (cap 1.5 MiB): normal, 42 steps, 1 segment, peak 1.3 MiB>``."""
    head = f"<CompiledModel {_model_name(model.source_label)} {model.mode} (cap {_cap(model.memory_limit)})"
    try:
        schedule = model.schedule
    except HyperionError:  # symbolic dims not bound yet: planned by the first run's feeds
        return f"{head}: not planned yet, input shapes come with the first run>"
    outputs = "" if len(schedule.graph_outputs) == len(model.output_names) else \
        f", outputs {', '.join(schedule.graph_outputs)}"
    return (f"{head}: {schedule.mode}, {_plural(len(schedule.steps), 'step')}, "
            f"{_plural(len(schedule.segments), 'segment')}, peak {format_size(schedule.peak_bytes)}{outputs}>")


def memory_png(schedule: Schedule) -> bytes | None:
    """The memory timeline as PNG bytes; None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from hyperion.tools.plot import plot_memory

    with tempfile.TemporaryDirectory(prefix="hyperion-plot-") as folder:
        try:
            return plot_memory(schedule, Path(folder) / "memory.png").read_bytes()
        except OptionError:  # matplotlib present but unusable
            return None


def summary_rows(schedule: Schedule) -> list[tuple[str, str]]:
    """The lines of :func:`hyperion.tools.report.summary` as (key, value) pairs, plus the outputs."""
    from hyperion.tools.report import summary

    rows = []
    for line in summary(schedule).splitlines():
        key, value = line[:SUMMARY_KEY_WIDTH], line[SUMMARY_KEY_WIDTH + 1:]
        if line[SUMMARY_KEY_WIDTH:SUMMARY_KEY_WIDTH + 1] != " " or not key.strip():
            key, value = "", line
        rows.append((key.strip(), value))
    rows.append(("outputs", ", ".join(schedule.graph_outputs)))
    return rows


def schedule_html(schedule: Schedule, *, title: str | None = None) -> str:
    """A ``<div>``: heading, summary table and, with matplotlib, the memory timeline."""
    cells = "".join(f"<tr><th style=\"text-align:left\">{html.escape(key)}</th>"
                    f"<td style=\"text-align:left\">{html.escape(value)}</td></tr>"
                    for key, value in summary_rows(schedule))
    parts = [f"<div class=\"hyperion-schedule\"><p><code>{html.escape(title or schedule_repr(schedule))}</code></p>",
             f"<table>{cells}</table>"]
    png = memory_png(schedule)
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<img alt=\"memory timeline\" style=\"max-width:100%\" src=\"data:image/png;base64,{data}\"/>")
    else:
        parts.append("<p><em>memory timeline: pip install 'hyperion[plot]' (matplotlib)</em></p>")
    parts.append("</div>")
    return "".join(parts)


def compiled_model_html(model: CompiledModel) -> str:
    """The current plan's view, headed by the model's one-line repr."""
    title = compiled_model_repr(model)
    try:
        schedule = model.schedule
    except HyperionError:
        return f"<div class=\"hyperion-model\"><p><code>{html.escape(title)}</code></p></div>"
    return schedule_html(schedule, title=title)
