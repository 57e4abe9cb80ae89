"""Human-readable views of a schedule: summary, per-step table, Graphviz and trace exports."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence

from hyperion.schedule import Schedule
from hyperion.units import format_size

KIND_COLORS = {"sequential": "black", "residual": "blue", "attention": "red"}


def summary(schedule: Schedule) -> str:
    kinds = Counter(e.kind.value for e in schedule.edges)
    cap = format_size(schedule.memory_limit) if schedule.memory_limit else "none"
    lines = [
        f"model        {schedule.model.path or '<in-memory>'} (opset {schedule.model.opset})",
        f"mode         {schedule.mode} (requested {schedule.requested_mode}): {schedule.mode_reason}",
        f"memory limit {cap}",
        f"peak         {format_size(schedule.peak_bytes)} ({schedule.peak_bytes} bytes accounted)",
        f"lower bound  {format_size(schedule.lower_bound_bytes)}; arena {format_size(schedule.arena_bytes)}",
        f"steps        {len(schedule.steps)} in {len(schedule.segments)} segment(s)",
        "edges        " + (", ".join(f"{kinds[k]} {k}" for k in sorted(kinds)) or "none"),
    ]
    if schedule.streaming is not None:
        lines.append(f"batch chunk  {schedule.streaming.chunk} of {schedule.streaming.batch_size} samples")
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: the benchmarks print theirs with it, for docs/."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def step_table(schedule: Schedule) -> str:
    """One row per step: segment, node, op, incoming edge kinds, live bytes, tensors freed."""
    incoming: dict[str, Counter] = {}
    for edge in schedule.edges:
        incoming.setdefault(edge.dst, Counter())[edge.kind.value] += 1
    header = f"{'step':>5} {'seg':>4}  {'node':<28} {'op':<18} {'depends on':<24} {'live':>10}  frees"
    rows = [header, "-" * len(header)]
    for step in schedule.steps:
        deps = ", ".join(f"{n} {k}" for k, n in sorted(incoming.get(step.node, Counter()).items())) or "inputs only"
        frees = ", ".join(step.frees)
        rows.append(f"{step.index:>5} {step.segment:>4}  {step.node[:28]:<28} {step.op_type[:18]:<18} "
                    f"{deps[:24]:<24} {format_size(step.live_bytes):>10}  {frees}")
    return "\n".join(rows)


def to_dot(schedule: Schedule) -> str:
    """The dependency graph in Graphviz's language, edges coloured by kind, nodes by segment."""
    lines = ["digraph hyperion {", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
    for segment in schedule.segments:
        lines.append(f"  subgraph cluster_{segment.index} {{ label=\"segment {segment.index}\";")
        for i in segment.steps:
            step = schedule.steps[i]
            label = json.dumps(f"{step.index}: {step.node}\n{step.op_type}")
            lines.append(f"    {json.dumps(step.node)} [label={label}];")
        lines.append("  }")
    for edge in schedule.edges:
        lines.append(f"  {json.dumps(edge.src)} -> {json.dumps(edge.dst)} "
                     f"[color={KIND_COLORS.get(edge.kind.value, 'gray')}, label={json.dumps(edge.kind.value[0])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_trace(schedule: Schedule, step_ms: Iterable[float] | None = None) -> str:
    """Chrome trace-event JSON (chrome://tracing, Perfetto): one slice per step and a
    memory counter. Without measured times every step is drawn 1 ms long."""
    durations = list(step_ms) if step_ms is not None else [1.0] * len(schedule.steps)
    events, clock_us = [], 0.0
    for step, ms in zip(schedule.steps, durations, strict=False):
        events.append({"name": step.node, "cat": step.op_type, "ph": "X", "ts": clock_us, "dur": ms * 1e3,
                       "pid": 1, "tid": step.segment, "args": {"frees": list(step.frees)}})
        events.append({"name": "live bytes", "ph": "C", "ts": clock_us, "pid": 1,
                       "args": {"live_bytes": step.live_bytes}})
        clock_us += ms * 1e3
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}, indent=1) + "\n"
