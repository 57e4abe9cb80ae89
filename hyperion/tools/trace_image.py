"""A measured trace drawn as a timeline image with matplotlib, and the docs' pictures.

Perfetto's UI is a web app; where it cannot be reached (or to put a trace in a document),
:func:`render_trace` draws the same trace events: one row per track with spans stacked by
nesting depth (run, chunks, segments; sessions built, waited for and released; the prefetch
thread; onnxruntime's per-node times), and below them the counters (RSS, the plan's
accounted bytes, weights in live sessions) on the same time axis.

``python -m hyperion.tools.trace_image [OUTPUT_DIR]`` (``make docs-images``) traces a run of
the bundled demo model under a 1.5 MB cap and writes docs/images/: the trace, its picture,
and the memory timeline with the measured RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hyperion.errors import OptionError

MIB = 1024 * 1024
CAT_COLORS = {"run": "#B0B0B0", "chunk": "#CFCFCF", "segment": "#4C72B0", "session": "#DD8452",
              "onnxruntime": "#9DB4D6", "node": "#55A868"}
COUNTER_STYLE = {"process RSS": ("magenta", "process RSS change"),
                 "accounted bytes (plan)": ("black", "accounted bytes (plan)"),
                 "weights in live sessions (plan)": ("#DD8452", "weights in live sessions (plan)"),
                 "arrays held between segments": ("#55A868", "arrays held between segments")}


def render_trace(trace: Mapping[str, Any] | str | os.PathLike, output: str | os.PathLike, *,
                 title: str | None = None) -> Path:
    """Draw ``trace`` (trace-event JSON, as ``hyperion run --trace`` writes) into ``output``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("drawing a trace needs matplotlib: pip install 'hyperion[plot]'") from None
    data = trace if isinstance(trace, Mapping) else json.loads(Path(trace).read_text(encoding="utf-8"))
    events = data["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    process = next((e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"), "trace")
    spans = [e for e in events if e["ph"] == "X"]
    instants = [e for e in events if e["ph"] == "i"]
    counters = [e for e in events if e["ph"] == "C"]
    timed = spans + instants + counters
    origin = min((e["ts"] for e in spans), default=0.0)
    ms = lambda us: (us - origin) / 1e3  # noqa: E731

    # Rows: per track, one row per nesting depth.
    tracks = [tid for tid in sorted(names) if any(e["tid"] == tid for e in spans + instants)]
    depth_of: dict[int, int] = {}
    rows_of: dict[int, int] = {}
    for tid in tracks:
        stack: list[float] = []
        deepest = 0
        for i, span in sorted(((i, s) for i, s in enumerate(spans) if s["tid"] == tid),
                              key=lambda p: (p[1]["ts"], -p[1]["dur"])):
            while stack and stack[-1] <= span["ts"]:
                stack.pop()
            depth_of[i] = len(stack)
            deepest = max(deepest, len(stack))
            stack.append(span["ts"] + span["dur"])
        rows_of[tid] = deepest + 1
    row_base: dict[int, int] = {}
    row = 0
    for tid in tracks:
        row_base[tid] = row
        row += rows_of[tid]
    total_rows = max(row, 1)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 2.2 + 0.42 * total_rows + 2.6), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [0.42 * total_rows + 0.6, 2.6]})
    end = max((ms(e["ts"] + e.get("dur", 0)) for e in timed), default=1.0)
    for i, span in enumerate(spans):
        y = row_base[span["tid"]] + depth_of[i]
        x0, width = ms(span["ts"]), span["dur"] / 1e3
        color = CAT_COLORS.get(span.get("cat", ""), "#8172B3")
        top.broken_barh([(x0, max(width, end * 1e-4))], (y + 0.08, 0.84), facecolors=color, edgecolor="white",
                        linewidth=0.4)
        label = span["name"]
        if width > end * 0.012 * max(len(label), 4) / 4:
            top.text(x0 + width / 2, y + 0.5, label if width > end * 0.006 * len(label) else label[:8],
                     ha="center", va="center", fontsize=6.5, clip_on=True,
                     color="white" if span.get("cat") in ("segment", "node") else "black")
    for event in instants:
        y = row_base[event["tid"]] + rows_of[event["tid"]] - 0.5
        top.plot([ms(event["ts"])], [y], marker="v", color="#C44E52", markersize=6)
    top.set_yticks([row_base[t] + rows_of[t] / 2 for t in tracks], [names[t] for t in tracks], fontsize=8)
    for tid in tracks[1:]:
        top.axhline(row_base[tid], color="gray", linewidth=0.5)
    top.set_ylim(total_rows, 0)
    top.set_title(title or process, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in CAT_COLORS.values()]
    top.legend(handles + [plt.Line2D([], [], marker="v", color="#C44E52", linestyle="")],
               [*CAT_COLORS, "session released"], loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7,
               frameon=False)

    series: dict[str, list[tuple[float, float]]] = {}
    for event in sorted(counters, key=lambda e: e["ts"]):
        for value in event["args"].values():
            series.setdefault(event["name"], []).append((ms(event["ts"]), value))
    for name, points in series.items():
        color, label = COUNTER_STYLE.get(name, ("gray", name))
        xs = [x for x, _ in points] + [end]
        base = points[0][1] if name == "process RSS" else 0
        ys = [(v - base) / MIB for _, v in points]
        bottom.step(xs, ys + ys[-1:], where="post", color=color, linewidth=1.2, label=label)
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("milliseconds since the first span (measured)")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
    bottom.set_xlim(0, end * 1.01)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output


def docs_images(directory: Path, limit: str = "1.5MB") -> list[Path]:
    """Trace the bundled demo model under ``limit`` and write the docs' pictures into ``directory``."""
    from importlib.resources import as_file

    import hyperion
    from hyperion.schedule import write_atomic
    from hyperion.tools.demo import BUNDLED_DEMO, DEMO_SEED
    from hyperion.tools.feeds import input_shapes_of, random_feeds
    from hyperion.tools.plot import plot_memory

    directory.mkdir(parents=True, exist_ok=True)
    with as_file(BUNDLED_DEMO) as model:
        cm = hyperion.compile(model, memory_limit=limit, input_shapes={"image": [1, 3, 64, 64]})
        feeds = random_feeds(cm.base_ir, input_shapes_of(cm.base_ir, {"image": [1, 3, 64, 64]}), DEMO_SEED)
        cm.run(feeds)   # onnxruntime's one-time costs (code paged in, thread pools) come before the trace
        trace_path = directory / "demo-trace.json"
        with cm.tracing(trace_path) as tracing:
            cm.run(feeds)
        trace = tracing.trace
        assert trace is not None
        # The committed trace names the model by its file name, not this machine's path.
        text = trace_path.read_text(encoding="utf-8").replace(json.dumps(str(model))[1:-1], model.name)
        write_atomic(trace_path, text)
        schedule = cm.schedule
    picture = render_trace(trace, directory / "demo-trace.png",
                           title=f"hyperion run --trace: demo.onnx under a {limit} cap ({schedule.mode}, "
                                 f"{len(schedule.segments)} segments), drawn with matplotlib")
    timeline = plot_memory(schedule, directory / "demo-memory.png", trace=trace)
    return [trace_path, picture, timeline]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperion.tools.trace_image",
                                     description="Draw a trace as a timeline image, or (no --trace) make the "
                                                 "docs' pictures from the bundled demo model.")
    parser.add_argument("output", type=Path, nargs="?", default=Path("docs/images"),
                        help="with --trace: the image; else the folder for the docs' pictures")
    parser.add_argument("--trace", type=Path, help="a trace from 'hyperion run --trace'")
    args = parser.parse_args(argv)
    if args.trace is not None:
        print(f"trace drawn in {render_trace(args.trace, args.output)}")
        return 0
    for path in docs_images(args.output):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
