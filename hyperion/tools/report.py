"""Views of a schedule: summary, per-step table, what is alive at a step, bytes by role,
the same figures as JSON (``inspect --json``), Graphviz and planned-trace exports."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hyperion.ir import TensorRole
from hyperion.schedule import Region, Schedule, Step
from hyperion.units import format_size

KIND_COLORS = {"sequential": "black", "residual": "blue", "attention": "red", "none": "gray"}
MB = 1e6

# The layers of the memory timeline, bottom to top (plot.py stacks them in this order).
ROLE_INPUTS = "graph inputs"
ROLE_ACTIVATIONS = "activations"
ROLE_OUTPUTS = "graph outputs"
ROLE_PINNED = "batch buffers (streaming)"
ROLE_WEIGHTS = "weights: running segment's session"
ROLE_OTHER_SESSIONS = "weights: kept, prefetched or loading sessions"
ROLES = (ROLE_WEIGHTS, ROLE_OTHER_SESSIONS, ROLE_INPUTS, ROLE_ACTIVATIONS, ROLE_OUTPUTS, ROLE_PINNED)
_TENSOR_ROLE = {TensorRole.INPUT: ROLE_INPUTS, TensorRole.ACTIVATION: ROLE_ACTIVATIONS,
                TensorRole.OUTPUT: ROLE_OUTPUTS}


def peak_step(schedule: Schedule) -> int | None:
    """The first step at the schedule's highest accounted bytes (None: no steps)."""
    if not schedule.steps:
        return None
    return max(schedule.steps, key=lambda s: (s.live_bytes, -s.index)).index


def summary(schedule: Schedule) -> str:
    kinds = Counter(e.kind.value for e in schedule.edges)
    cap = format_size(schedule.memory_limit) if schedule.memory_limit else "none"
    peak = peak_step(schedule)
    where = "" if peak is None else f" at step {peak} ({schedule.steps[peak].node})"
    lines = [
        f"model        {schedule.model.path or '<in-memory>'} (opset {schedule.model.opset})",
        f"mode         {schedule.mode} (requested {schedule.requested_mode}): {schedule.mode_reason}",
        f"memory limit {cap}",
        f"peak         {format_size(schedule.peak_bytes)} ({schedule.peak_bytes} bytes accounted){where}",
        f"lower bound  {format_size(schedule.lower_bound_bytes)}; arena {format_size(schedule.arena_bytes)}",
        f"steps        {len(schedule.steps)} in {len(schedule.segments)} segment(s)",
        _sessions_line(schedule),
        "smallest cap " + (format_size(schedule.optimal_peak_bytes) + " (proven: the leanest plan's peak)"
                           if schedule.optimal_peak_bytes is not None else "not known from this schedule"),
        "edges        " + (", ".join(f"{kinds[k]} {k}" for k in sorted(kinds)) or "none"),
    ]
    if schedule.streaming is not None:
        lines.append(f"batch chunk  {schedule.streaming.chunk} of {schedule.streaming.batch_size} samples")
    if schedule.replan is not None:  # docs/dynamic_shapes.md
        lines.append(f"re-planned   {schedule.replan.reason}")
    tiled = [step for step in schedule.steps if step.tiles is not None]
    gathers = [step for step in schedule.steps if step.row_gather is not None]
    if tiled or gathers:
        lines.append(f"split steps  {len(tiled)} tiled ({sum(len(s.tiles.bounds) - 1 for s in tiled)} tiles), "  # type: ignore[union-attr]
                     f"{len(gathers)} row gather(s)")
    regions = [segment for segment in schedule.segments if segment.region is not None]
    if regions:
        lines.append(f"regions      {len(regions)} run tile by tile along a free axis "
                     f"({sum(len(s.region.bounds) - 1 for s in regions)} tiles, "  # type: ignore[union-attr]
                     f"{sum(s.last_step - s.first_step + 1 for s in regions)} steps)")
        spatial = [s for s in regions if s.region.patches is not None]  # type: ignore[union-attr]
        if spatial:
            lines.append(f"             {len(spatial)} of them in spatial patches along rows, with halos "
                         f"({sum(len(s.region.bounds) - 1 for s in spatial)} patches)")  # type: ignore[union-attr]
    return "\n".join(lines)


def _sessions_line(schedule: Schedule) -> str:
    """How many sessions runs keep, and how many they build again (slower: in a fed plan, those
    whose bookkeeping the cap leaves no room to keep, segment rule 9; in a packed one, every
    streamed segment's)."""
    rebuilt = sum(not segment.persistent for segment in schedule.segments)
    kept = len(schedule.segments) - rebuilt
    line = f"sessions     {kept} kept across runs" + (f", {rebuilt} built on every run" if rebuilt else "")
    if schedule.kept_heap_bytes:   # segment rule 14
        line += f"; they share an arena of {format_size(schedule.kept_heap_bytes)} whose pages runs keep"
    return line


SUB_STEPS_SHOWN = 6   # tiles listed per tiled step; the rest are summed up in one line


def sub_steps(step: Step) -> list[str]:
    """What a step split by the tile pass does, one line per tile (or per row gather)."""
    if step.row_gather is not None:
        gather = step.row_gather
        return [f"reads at most {format_size(gather.read_bytes)} of the {gather.rows} rows of {gather.weight} "
                f"(rows named by {gather.indices}, read by position, never mapped)"]
    if step.tiles is None:
        return []
    tiles = step.tiles
    edges = list(zip(tiles.bounds, tiles.bounds[1:], strict=False))
    where = "in place" if tiles.in_place else "copied in"
    lines = [f"tile {i}/{len(edges)}: {tiles.output}[axis {tiles.output_axis}: {a}:{b}] from {tiles.weight}"
             f"[axis {tiles.weight_axis}: {a}:{b}], {where}" for i, (a, b) in enumerate(edges[:SUB_STEPS_SHOWN])]
    if len(edges) > SUB_STEPS_SHOWN:
        lines.append(f"... {len(edges) - SUB_STEPS_SHOWN} more tiles up to {tiles.bounds[-1]}; one weight tile "
                     f"buffer of {format_size(tiles.staging_bytes)} shared by all")
    return lines


def region_tiles(schedule: Schedule, step: Step) -> list[str]:
    """At the first step of a region: its tiles, one line each (the rest summed up)."""
    segment = schedule.segments[step.segment] if step.segment < len(schedule.segments) else None
    if segment is None or segment.region is None or segment.first_step != step.index:
        return []
    region = segment.region
    if region.patches is not None:
        return _patch_lines(segment.first_step, segment.last_step, region)
    edges = list(zip(region.bounds, region.bounds[1:], strict=False))
    sliced = ", ".join(f"{name}[axis {axis}]" for name, axis in region.sliced.items()) or "nothing"
    written = ", ".join(f"{name}[axis {axis}]" for name, axis in region.outputs.items())
    lines = [f"region: steps {segment.first_step}-{segment.last_step}, one session, {len(edges)} tiles along "
             f"an axis of {region.size}; slices {sliced}; writes {written}"]
    lines += [f"tile {i}/{len(edges)}: {a}:{b}" for i, (a, b) in enumerate(edges[:SUB_STEPS_SHOWN])]
    if len(edges) > SUB_STEPS_SHOWN:
        lines.append(f"... {len(edges) - SUB_STEPS_SHOWN} more tiles up to {region.size}; staging "
                     f"{format_size(region.staging_bytes)}")
    return lines


def _patch_lines(first: int, last: int, region: Region) -> list[str]:
    """A spatial region: its patches, each with the input rows it reads (halo included) and
    the padding rows its Convs and pools are handed where it touches a border."""
    patches = region.patches
    assert patches is not None
    edges = list(zip(region.bounds, region.bounds[1:], strict=False))
    written = ", ".join(region.outputs)
    lines = [f"region: steps {first}-{last}, one session, {len(edges)} patches of {region.size} rows with halos; "
             f"writes {written}; {len(patches.pads)} padded node(s), {len(patches.crops)} cropped edge(s)"]
    for i, (a, b) in enumerate(edges[:SUB_STEPS_SHOWN]):
        reads = ", ".join(f"{name} rows {rows[i][0]}:{rows[i][1]}" for name, rows in patches.rows.items())
        padded = sum(1 for pad in patches.pads if pad.rows[i] != (0, 0))
        lines.append(f"patch {i}/{len(edges)}: rows {a}:{b}; reads {reads or 'nothing sliced'}"
                     + (f"; padding at {padded} node(s)" if padded else ""))
    if len(edges) > SUB_STEPS_SHOWN:
        lines.append(f"... {len(edges) - SUB_STEPS_SHOWN} more patches up to {region.size}; staging "
                     f"{format_size(region.staging_bytes)}")
    return lines


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: the benchmarks print theirs with it, for docs/."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def spread(values: Sequence[float]) -> str:
    """Median and range of repeated measurements, as the benchmarks' tables print them."""
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


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
        rows += [f"{'':>11}  - {line}" for line in (*sub_steps(step), *region_tiles(schedule, step))]
    return "\n".join(rows)


# -- what is alive, by role -------------------------------------------------------------
@dataclass(frozen=True)
class Alive:
    """A tensor resident at a step, as the plan accounts it."""

    name: str
    role: str          # one of ROLES
    bytes: int
    first: int | None  # first step it is resident at (-1: before the run, a graph input; None: a weight)
    last: int | None   # last step it is resident at (None: a weight, held as long as its session)


def tensor_intervals(schedule: Schedule) -> dict[str, tuple[int, int]]:
    """(first, last) step every graph input, activation and output is resident, as the plan
    counts it: from its producer (or before step 0) to its last reader (outputs: to the end);
    one defined before the segment of its last reader is held to that segment's end, since the
    runtime feeds it to the segment's session."""
    step_of = {step.node: step.index for step in schedule.steps}
    last_step = len(schedule.steps) - 1
    intervals: dict[str, tuple[int, int]] = {}
    for name, record in schedule.tensors.items():
        if record.role is TensorRole.WEIGHT:
            continue
        uses = [step_of[c] for c in record.consumers if c in step_of]
        first = -1 if record.producer is None or record.producer not in step_of else step_of[record.producer]
        if first < 0 and not uses and name not in schedule.graph_outputs:
            continue  # an input nothing reads: never held
        last = max(uses, default=first)
        if name in schedule.graph_outputs:
            last = max(last_step, first)
        last = max(last, first)
        if 0 <= last <= last_step:
            segment = schedule.segment_of(last)
            if first < segment.first_step:
                last = max(last, segment.last_step)
        intervals[name] = (first, last)
    return intervals


def _session_weights(schedule: Schedule, step: int) -> dict[str, str]:
    """Weights held by live sessions at ``step``: name -> ROLE_WEIGHTS or ROLE_OTHER_SESSIONS."""
    segment = schedule.segment_of(step)
    held = dict.fromkeys(segment.weights, ROLE_WEIGHTS)
    others: list[int] = []
    if schedule.mode.value == "normal":
        others = [s.index for s in schedule.segments]
    else:
        others = [s.index for s in schedule.segments if s.cached]
        following = segment.index + 1 if segment.index + 1 < len(schedule.segments) else (
            0 if schedule.cyclic_prefetch and segment.index > 0 else None)
        if schedule.prefetch and following is not None:
            others.append(following)
    for index in others:
        for name in schedule.segments[index].weights:
            held.setdefault(name, ROLE_OTHER_SESSIONS)
    return held


def alive_at(schedule: Schedule, step: int) -> list[Alive]:
    """Tensors resident at ``step``, largest first: graph inputs, activations and outputs by
    liveness, and the weights of the sessions the plan counts as live (the running segment's,
    kept ones, and the one prefetched)."""
    if not 0 <= step < len(schedule.steps):
        raise IndexError(f"step {step} is out of range: the schedule has steps 0-{len(schedule.steps) - 1}")
    alive = [Alive(name, _TENSOR_ROLE[schedule.tensors[name].role], schedule.tensors[name].bytes or 0, first, last)
             for name, (first, last) in tensor_intervals(schedule).items() if max(first, 0) <= step <= last]
    for name, role in _session_weights(schedule, step).items():
        alive.append(Alive(name, role, schedule.tensors[name].bytes or 0, None, None))
    return sorted(alive, key=lambda a: (-a.bytes, a.name))


def role_bytes(schedule: Schedule) -> dict[str, list[int]]:
    """Accounted bytes at every step split by role (ROLES); the layers sum to ``live_bytes``.

    Graph inputs, activations and outputs are their tensors' sizes; batch buffers are the
    streaming schedule's pinned bytes; what the plan counts beyond those is weights: the
    running segment's session (its ``held_bytes``, packed copies included) and then the rest
    -- kept sessions, the one prefetched, a weight's original while it is packed, and
    per-session overhead."""
    n = len(schedule.steps)
    layers = {role: [0] * n for role in ROLES}
    delta = {role: [0] * (n + 1) for role in (ROLE_INPUTS, ROLE_ACTIVATIONS, ROLE_OUTPUTS)}
    for name, (first, last) in tensor_intervals(schedule).items():
        role = _TENSOR_ROLE[schedule.tensors[name].role]
        delta[role][max(first, 0)] += schedule.tensors[name].bytes or 0
        delta[role][last + 1] -= schedule.tensors[name].bytes or 0
    for role, changes in delta.items():
        running = 0
        for i in range(n):
            running += changes[i]
            layers[role][i] = running
    normal = schedule.mode.value == "normal"
    for step in schedule.steps:
        i = step.index
        rest = step.live_bytes - sum(layers[r][i] for r in (ROLE_INPUTS, ROLE_ACTIVATIONS, ROLE_OUTPUTS))
        layers[ROLE_PINNED][i] = pinned = min(schedule.pinned_bytes, max(rest, 0))
        rest -= pinned
        own = max(rest, 0) if normal else min(schedule.segments[step.segment].held_bytes, max(rest, 0))
        layers[ROLE_WEIGHTS][i] = own
        layers[ROLE_OTHER_SESSIONS][i] = rest - own
    return layers


# -- as data (inspect --json) ---------------------------------------------------------------
def inspect_data(schedule: Schedule) -> dict[str, Any]:
    """Every figure ``hyperion inspect`` prints, as plain data, plus a summary."""
    incoming: dict[str, Counter] = {}
    for edge in schedule.edges:
        incoming.setdefault(edge.dst, Counter())[edge.kind.value] += 1
    peak = peak_step(schedule)
    roles = role_bytes(schedule)
    return {
        "summary": {
            "model": schedule.model.path, "model_sha256": schedule.model.sha256, "opset": schedule.model.opset,
            "mode": str(schedule.mode), "requested_mode": str(schedule.requested_mode),
            "mode_reason": schedule.mode_reason, "memory_limit_bytes": schedule.memory_limit,
            "peak_bytes": schedule.peak_bytes,
            "peak_step": peak, "peak_node": None if peak is None else schedule.steps[peak].node,
            "lower_bound_bytes": schedule.lower_bound_bytes, "arena_bytes": schedule.arena_bytes,
            "smallest_feasible_cap_bytes": schedule.optimal_peak_bytes,
            "steps": len(schedule.steps), "segments": len(schedule.segments),
            "edge_kinds": dict(sorted(Counter(e.kind.value for e in schedule.edges).items())),
            "pinned_bytes": schedule.pinned_bytes, "prefetch": schedule.prefetch,
            "whole_model": schedule.whole_model,
            "streaming": None if schedule.streaming is None else {
                "batch_size": schedule.streaming.batch_size, "chunk": schedule.streaming.chunk},
        },
        "segments": [{"index": seg.index, "first_step": seg.first_step, "last_step": seg.last_step,
                      "peak_bytes": seg.peak_bytes, "held_bytes": seg.held_bytes,
                      "loading_bytes": seg.loading_bytes, "cached": seg.cached, "weights": len(seg.weights),
                      "inputs": list(seg.inputs), "outputs": list(seg.outputs),
                      "region": None if seg.region is None else {**asdict(seg.region),
                                                                  "bounds": list(seg.region.bounds)}}
                     for seg in schedule.segments],
        "steps": [{"index": step.index, "segment": step.segment, "node": step.node, "op": step.op_type,
                   "depends_on": dict(sorted(incoming.get(step.node, Counter()).items())),
                   "live_bytes": step.live_bytes, "bytes_by_role": {r: roles[r][step.index] for r in ROLES},
                   "frees": list(step.frees), "loads": list(step.loads), "evicts": list(step.evicts),
                   "row_gather": None if step.row_gather is None else asdict(step.row_gather),
                   "tiles": None if step.tiles is None else {**asdict(step.tiles), "bounds": list(step.tiles.bounds)}}
                  for step in schedule.steps],
    }


def alive_data(schedule: Schedule, step: int) -> dict[str, Any]:
    record = schedule.steps[step]
    alive = alive_at(schedule, step)
    return {"step": step, "node": record.node, "op": record.op_type, "segment": record.segment,
            "live_bytes": record.live_bytes, "tensor_bytes": sum(a.bytes for a in alive),
            "tensors": [{"name": a.name, "role": a.role, "bytes": a.bytes, "first_step": a.first,
                         "last_step": a.last} for a in alive]}


def alive_table(schedule: Schedule, step: int) -> str:
    """``inspect --at STEP``: the tensors resident at a step, with sizes and roles."""
    data = alive_data(schedule, step)
    lines = [f"step {step} ({data['node']}, {data['op']}) in segment {data['segment']}: "
             f"{format_size(data['live_bytes'])} accounted, {len(data['tensors'])} tensor(s) resident "
             f"({format_size(data['tensor_bytes'])})",
             f"{'bytes':>10}  {'role':<46} {'steps':<9} tensor"]
    for t in data["tensors"]:
        first = t["first_step"]
        span = "session" if first is None else f"{first}-{t['last_step']}" if first >= 0 else f"in-{t['last_step']}"
        lines.append(f"{format_size(t['bytes']):>10}  {t['role']:<46} {span:<9} {t['name']}")
    return "\n".join(lines)


def _dot_id(text: str) -> str:
    return json.dumps(text)  # a double-quoted Graphviz ID (JSON escapes are Graphviz's for " and \\)


def to_dot(schedule: Schedule) -> str:
    """The dependency graph in Graphviz's language: one node per step labelled with its op and
    the accounted MB at it (the peak step in bold red), edges coloured by kind (with a ``kind``
    attribute), one cluster per segment. Renders with ``dot -Tsvg``."""
    peak = peak_step(schedule)
    title = (f"{schedule.model.path or 'model'}: {schedule.mode}, peak {schedule.peak_bytes / MB:.2f} MB "
             f"in {len(schedule.segments)} segment(s)")
    lines = ["digraph hyperion {", "  rankdir=TB;", "  node [shape=box, fontsize=10, style=rounded];",
             f"  labelloc=t; label={_dot_id(title)};"]
    for segment in schedule.segments:
        cached = ", kept" if segment.cached else ""
        lines.append(f"  subgraph cluster_{segment.index} {{")
        label = (f"segment {segment.index} (steps {segment.first_step}-{segment.last_step}, "
                 f"weights {segment.held_bytes / MB:.2f} MB{cached})")
        lines.append(f"    label={_dot_id(label)};")
        lines.append("    style=dashed; color=gray50;")
        for i in segment.steps:
            step = schedule.steps[i]
            label = f"{step.index}: {step.node}\n{step.op_type} · {step.live_bytes / MB:.2f} MB live"
            extra = ", color=red, penwidth=2, fontcolor=red" if i == peak else ""
            lines.append(f"    {_dot_id(step.node)} [label={_dot_id(label)}, op={_dot_id(step.op_type)}, "
                         f"step={step.index}, live_bytes={step.live_bytes}{extra}];")
        lines.append("  }")
    for edge in schedule.edges:
        kind = edge.kind.value
        style = ", style=dashed" if kind in ("residual", "attention") else ""
        lines.append(f"  {_dot_id(edge.src)} -> {_dot_id(edge.dst)} [color={KIND_COLORS.get(kind, 'gray')}, "
                     f"kind={kind}, tensor={_dot_id(edge.tensor)}{style}];")
    legend = ", ".join(f"{k}: {c}" for k, c in KIND_COLORS.items() if k != "none")
    lines.append(f"  // edge colours by kind: {legend}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_trace(schedule: Schedule, step_ms: Iterable[float] | None = None) -> str:
    """Chrome trace-event JSON (chrome://tracing, Perfetto) of the *plan*: one slice per step
    and a memory counter. Without measured times every step is drawn 1 ms long, and the
    trace's metadata says so; ``hyperion run --trace`` records a measured one."""
    measured = step_ms is not None
    durations = list(step_ms) if step_ms is not None else [1.0] * len(schedule.steps)
    name = f"hyperion schedule: {schedule.model.path or 'model'} ({schedule.mode}, " + (
        "step times given)" if measured else "planned, not measured: every step drawn 1 ms)")
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "ts": 0,
                                     "args": {"name": name}}]
    clock_us = 0.0
    for step, ms in zip(schedule.steps, durations, strict=False):
        events.append({"name": step.node, "cat": step.op_type, "ph": "X", "ts": clock_us, "dur": ms * 1e3,
                       "pid": 1, "tid": step.segment, "args": {"frees": list(step.frees)}})
        events.append({"name": "live bytes", "ph": "C", "ts": clock_us, "pid": 1, "tid": 0,
                       "args": {"live_bytes": step.live_bytes}})
        clock_us += ms * 1e3
    other = {"source": "given step times" if measured else "planned",
             "note": "times given by the caller" if measured else
             "planned, not measured: every step is drawn 1 ms long; hyperion run --trace records a measured trace"}
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}, indent=1) + "\n"
