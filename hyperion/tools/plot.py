"""Memory timeline of a schedule: a PNG (matplotlib, the ``plot`` extra) or an interactive
HTML page (plotly, also in the ``plot`` extra).

Live bytes per step are stacked by role (``report.role_bytes``: weights of the running
segment's session, of other live sessions, graph inputs, activations, graph outputs,
streaming batch buffers), with the cap and the lower bound, the peak marked with its node,
and segments shaded. Given a measured trace (``hyperion run --trace``), the process's RSS
is drawn over it: its change since the (last traced) run began, placed on the step axis
by the trace's segment spans.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hyperion.errors import OptionError
from hyperion.files import write_atomic
from hyperion.schedule import Schedule
from hyperion.tools.report import ROLES, alive_at, peak_step, region_tiles, role_bytes, sub_steps

MIB = 1024 * 1024
ROLE_COLORS = dict(zip(ROLES, ("#4C72B0", "#9DB4D6", "#55A868", "#DD8452", "#C44E52", "#8172B3"), strict=True))
WIDTH_IN, HEIGHT_IN, DPI = 11, 4.8, 100     # the PNG is 1100 x 480 pixels


def plot_memory(schedule: Schedule, output: str | os.PathLike, *, trace: str | os.PathLike | Mapping | None = None
                ) -> Path:
    """Write the memory timeline of ``schedule`` to ``output`` (``.html``: interactive, with
    the tensors alive at each step on hover; anything else: an image matplotlib writes).
    ``trace``: a measured trace (path or loaded dict) whose RSS is drawn over the plan."""
    output = Path(output)
    rss = None if trace is None else measured_rss(schedule, trace)
    if output.suffix.lower() in (".html", ".htm"):
        return _plot_html(schedule, output, rss)
    return _plot_image(schedule, output, rss)


def _title(schedule: Schedule) -> str:
    title = (f"{Path(schedule.model.path or 'model').name}: {schedule.mode} mode, {len(schedule.segments)} "
             f"segment(s), peak {schedule.peak_bytes / MIB:.2f} MiB")
    if schedule.streaming is not None:
        chunks = -(-schedule.streaming.batch_size // schedule.streaming.chunk)
        title += f", run {chunks}x in chunks of {schedule.streaming.chunk} samples"
    return title


# -- measured RSS from a trace ---------------------------------------------------------
def measured_rss(schedule: Schedule, trace: str | os.PathLike | Mapping) -> tuple[list[float], list[float]]:
    """(step positions, MiB of RSS above its value when the run began) for the last traced run:
    a sample inside segment ``i``'s span is placed linearly across that segment's steps.
    Chunks of a streaming run overlay one another; ``nan`` separates them."""
    data = trace if isinstance(trace, Mapping) else _load_trace(Path(trace))
    events = data.get("traceEvents", [])
    runs = [e for e in events if e.get("ph") == "X" and e.get("cat") == "run"]
    start = runs[-1]["ts"] if runs else float("-inf")
    segments = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "segment" and e["ts"] >= start),
                      key=lambda e: e["ts"])
    samples = sorted((e["ts"], e["args"]["bytes"]) for e in events
                     if e.get("ph") == "C" and e.get("name") == "process RSS")
    if not samples or not segments:
        return [], []
    at_start = [v for t, v in samples if t <= start]
    base = at_start[-1] if at_start else samples[0][1]
    xs: list[float] = []
    ys: list[float] = []
    for span in segments:
        index = span.get("args", {}).get("segment", 0)
        if index >= len(schedule.segments):
            raise OptionError("--trace: the trace has more segments than the schedule; trace a run of this schedule")
        segment = schedule.segments[index]
        t0, t1 = span["ts"], span["ts"] + max(span["dur"], 1e-9)
        before = [v for t, v in samples if t <= t0]
        inside = [(t, v) for t, v in samples if t0 < t <= t1]
        points = ([(t0, before[-1])] if before else []) + inside
        if points:
            points.append((t1, points[-1][1]))   # RSS holds its last sample to the segment's end
        width = segment.last_step - segment.first_step + 1
        for t, v in points:
            xs.append(segment.first_step - 0.5 + width * (t - t0) / (t1 - t0))
            ys.append((v - base) / MIB)
        if index == len(schedule.segments) - 1:
            xs.append(float("nan"))
            ys.append(float("nan"))
    return xs, ys


def _load_trace(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionError(f"--trace {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"--trace {path}: not a trace file (invalid JSON: {exc})") from None


# -- PNG ---------------------------------------------------------------------------------
def _plot_image(schedule: Schedule, output: Path, rss: tuple[list[float], list[float]] | None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("plot needs matplotlib: pip install 'hyperion[plot]'") from None
    steps = [s.index for s in schedule.steps]
    layers = role_bytes(schedule)
    shown = [r for r in ROLES if any(layers[r])]
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    for segment in schedule.segments:
        if segment.index % 2:
            ax.axvspan(segment.first_step - 0.5, segment.last_step + 0.5, color="black", alpha=0.06, linewidth=0)
        if len(schedule.segments) <= 24:
            ax.text((segment.first_step + segment.last_step) / 2, 1.0, f"seg {segment.index}",
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7, color="dimgray")
    if steps:
        ax.stackplot(steps, [[b / MIB for b in layers[r]] for r in shown], labels=shown, step="mid",
                     colors=[ROLE_COLORS[r] for r in shown], alpha=0.9)
        live = [s.live_bytes / MIB for s in schedule.steps]
        ax.step(steps, live, where="mid", color="black", linewidth=0.8, label="accounted live bytes")
    _mark_split_steps(ax, schedule)
    if schedule.memory_limit:
        ax.axhline(schedule.memory_limit / MIB, color="tab:red", linestyle="--", linewidth=1.2, label="memory limit")
    ax.axhline(schedule.lower_bound_bytes / MIB, color="dimgray", linestyle=":", linewidth=1.2, label="lower bound")
    peak = peak_step(schedule)
    if peak is not None:
        step = schedule.steps[peak]
        ax.plot([peak], [step.live_bytes / MIB], marker="v", color="tab:red", markersize=8, zorder=5)
        ax.annotate(f"peak {step.live_bytes / MIB:.2f} MiB\n{step.node}", (peak, step.live_bytes / MIB),
                    xytext=(0, 14), textcoords="offset points", ha="center", fontsize=8, color="tab:red")
    if rss is not None and rss[0]:
        ax.plot(rss[0], rss[1], color="magenta", linewidth=1.4, drawstyle="steps-post",
                label="measured RSS change since the run began")
    top = max([s.live_bytes for s in schedule.steps] + [schedule.memory_limit or 0, 1]) / MIB
    if rss is not None and rss[1]:
        top = max(top, max((y for y in rss[1] if y == y), default=0))
    ax.set_ylim(0, top * 1.25)
    ax.set_xlim(-0.5, max(len(steps) - 0.5, 0.5))
    ax.set_xlabel("step (segments shaded alternately)")
    ax.set_ylabel("MiB")
    ax.set_title(_title(schedule), fontsize=10, pad=14)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    _save_atomic(fig, output)
    plt.close(fig)
    return output


TILE_MARKS = 64   # tile edges drawn per tiled step, at most


def _mark_split_steps(ax: Any, schedule: Schedule) -> None:
    """Tiled steps as their tiles (an edge per tile boundary across the step's width, and
    the count); row gathers as the rows they read."""
    labelled = False
    for step in schedule.steps:
        if step.tiles is not None:
            bounds = step.tiles.bounds
            stride = max(1, (len(bounds) - 1) // TILE_MARKS)
            for bound in bounds[::stride]:
                ax.plot([step.index - 0.5 + bound / bounds[-1]] * 2, [0, step.live_bytes / MIB], color="tab:purple",
                        linewidth=0.6, label=None if labelled else "tile edges (tiled steps)")
                labelled = True
            ax.annotate(f"{len(bounds) - 1} tiles", (step.index, step.live_bytes / MIB), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=7, color="tab:purple")
        elif step.row_gather is not None:
            ax.annotate("rows", (step.index, step.live_bytes / MIB), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=7, color="tab:purple")
    _mark_regions(ax, schedule)


def _mark_regions(ax: Any, schedule: Schedule) -> None:
    """Regions as their tiles: an edge per tile boundary across the region's steps, and the
    count; spatial patches (rows through Convs and pools, with halos) in a colour of their own."""
    labelled: set[str] = set()
    for segment in schedule.segments:
        region = segment.region
        if region is None:
            continue
        top = max(schedule.steps[i].live_bytes for i in segment.steps) / MIB
        left, width = segment.first_step - 0.5, segment.last_step - segment.first_step + 1
        stride = max(1, (len(region.bounds) - 1) // TILE_MARKS)
        kind, colour = ("patches", "tab:cyan") if region.patches is not None else ("tiles", "tab:olive")
        label = "patch edges (rows, with halos)" if region.patches is not None else "tile edges (regions)"
        for bound in region.bounds[::stride]:
            ax.plot([left + width * bound / region.size] * 2, [0, top], color=colour, linewidth=0.6,
                    label=None if label in labelled else label)
            labelled.add(label)
        ax.annotate(f"{len(region.bounds) - 1} {kind}", (left + width / 2, top), xytext=(0, 4),
                    textcoords="offset points", ha="center", fontsize=7, color=colour)


# -- HTML --------------------------------------------------------------------------------
HOVER_TENSORS = 12


def _plot_html(schedule: Schedule, output: Path, rss: tuple[list[float], list[float]] | None) -> Path:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise OptionError("plot -o *.html needs plotly: pip install 'hyperion[plot]'") from None
    from hyperion.schedule import write_atomic
    from hyperion.units import format_size

    steps = [s.index for s in schedule.steps]
    layers = role_bytes(schedule)
    hover = []
    for step in schedule.steps:
        alive = alive_at(schedule, step.index)
        lines = [f"<b>step {step.index}: {step.node}</b> ({step.op_type}, segment {step.segment})",
                 *sub_steps(step), *region_tiles(schedule, step),
                 f"accounted {format_size(step.live_bytes)}; {len(alive)} tensor(s) resident:"]
        lines += [f"{format_size(a.bytes)} {a.name} <i>({a.role})</i>" for a in alive[:HOVER_TENSORS]]
        if len(alive) > HOVER_TENSORS:
            lines.append(f"... and {len(alive) - HOVER_TENSORS} more")
        hover.append("<br>".join(lines))
    fig = go.Figure()
    for role in ROLES:
        if not any(layers[role]):
            continue
        fig.add_trace(go.Scatter(x=steps, y=[b / MIB for b in layers[role]], name=role, stackgroup="memory",
                                 line={"shape": "hvh", "width": 0.5, "color": ROLE_COLORS[role]},
                                 hovertemplate="%{y:.3f} MiB<extra>" + role + "</extra>"))
    fig.add_trace(go.Scatter(x=steps, y=[s.live_bytes / MIB for s in schedule.steps], name="accounted live bytes",
                             mode="lines", line={"shape": "hvh", "color": "black", "width": 1},
                             text=hover, hovertemplate="%{text}<extra></extra>"))
    if rss is not None and rss[0]:
        fig.add_trace(go.Scatter(x=rss[0], y=rss[1], name="measured RSS change since the run began", mode="lines",
                                 line={"color": "magenta", "shape": "hv"},
                                 hovertemplate="%{y:.2f} MiB<extra>RSS</extra>"))
    for segment in schedule.segments:
        if segment.index % 2:
            fig.add_vrect(x0=segment.first_step - 0.5, x1=segment.last_step + 0.5, fillcolor="black", opacity=0.06,
                          line_width=0)
    if schedule.memory_limit:
        fig.add_hline(y=schedule.memory_limit / MIB, line={"color": "red", "dash": "dash"},
                      annotation_text="memory limit")
    fig.add_hline(y=schedule.lower_bound_bytes / MIB, line={"color": "gray", "dash": "dot"},
                  annotation_text="lower bound")
    peak = peak_step(schedule)
    if peak is not None:
        fig.add_annotation(x=peak, y=schedule.steps[peak].live_bytes / MIB, text=f"peak: {schedule.steps[peak].node}",
                           showarrow=True, arrowcolor="red", font={"color": "red"})
    fig.update_layout(title=_title(schedule), xaxis_title="step (segments shaded alternately)", yaxis_title="MiB",
                      hovermode="x", template="plotly_white")
    return write_atomic(output, fig.to_html(include_plotlyjs=True, full_html=True))


def _save_atomic(fig, output: Path) -> None:
    """``fig`` written atomically, in the format its suffix names (an unknown one is an OptionError)."""
    fmt = output.suffix.lower().lstrip(".") or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise OptionError(f"{output}: cannot plot to a .{fmt} file; use .png, .svg or .pdf")
    write_atomic(output, lambda handle: fig.savefig(handle, format=fmt))


__all__ = ["measured_rss", "plot_memory"]
