"""Golden step tables: a schedule rendered as stable text, and the comparison with a file.

The table reads only the public schedule (``hyperion.Schedule``): steps, segments,
edges, tensors and the summary fields. Sets are sorted; only the step order and
the segment order carry meaning. ``HYPERION_UPDATE_GOLDEN=1`` rewrites the files
instead of comparing (see ``tests/golden/README.md``).
"""

from __future__ import annotations

import difflib
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from hyperion import Schedule

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_ENV = "HYPERION_UPDATE_GOLDEN"
EMPTY = "-"


def update_requested() -> bool:
    return os.environ.get(UPDATE_ENV, "") == "1"


def _cell(names: Iterable[str]) -> str:
    return ",".join(sorted(names)) or EMPTY


def _columns(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns two spaces apart, trailing spaces stripped."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip() for row in rows]


def _mode(schedule: Schedule) -> str:
    return str(getattr(schedule.mode, "value", schedule.mode))


def _edge_kind(kind: Any) -> str:
    return str(getattr(kind, "value", kind))


def render(schedule: Schedule, title: str, options: Mapping[str, Any]) -> str:
    """The step table of ``schedule``: steps, segments, tensor sizes, summary."""
    incoming: dict[str, list[str]] = defaultdict(list)
    for edge in schedule.edges:
        incoming[edge.dst].append(f"{edge.tensor}<-{edge.src}:{_edge_kind(edge.kind)}")
    stepped = {step.node for step in schedule.steps}
    stray = sorted(dst for dst in incoming if dst not in stepped)
    assert not stray, f"edges into nodes that are no step: {stray}"

    lines = [f"# {title}",
             "# compile(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")",
             "# in-edges: tensor<-producer:kind; frees: marked unneeded after the step;",
             "# loads/evicts: weights made resident before / released after the step", "",
             "steps"]
    rows = [["#", "node", "op", "in-edges", "frees", "loads", "evicts", "seg", "live_bytes"]]
    for step in schedule.steps:
        rows.append([str(step.index), step.node, step.op_type, _cell(incoming[step.node]), _cell(step.frees),
                     _cell(step.loads), _cell(step.evicts), str(step.segment), str(step.live_bytes)])
    lines += _columns(rows)

    lines += ["", "segments"]
    rows = [["#", "steps", "inputs", "outputs", "weights", "peak_bytes"]]
    for segment in schedule.segments:
        rows.append([str(segment.index), f"{segment.first_step}-{segment.last_step}", _cell(segment.inputs),
                     _cell(segment.outputs), _cell(segment.weights), str(segment.peak_bytes)])
    lines += _columns(rows)

    lines += ["", "tensors"]
    rows = [["name", "bytes"]]
    for name in sorted(schedule.tensors):
        size = schedule.tensors[name].bytes
        rows.append([name, EMPTY if size is None else str(size)])
    lines += _columns(rows)

    chunk = schedule.batch_chunk
    lines += ["", "summary"]
    lines += _columns([["mode", _mode(schedule)],
                       ["memory_limit", EMPTY if schedule.memory_limit is None else str(schedule.memory_limit)],
                       ["peak_bytes", str(schedule.peak_bytes)],
                       ["lower_bound_bytes", str(schedule.lower_bound_bytes)],
                       ["batch_chunk", EMPTY if chunk is None else str(chunk)]])
    return "\n".join(lines) + "\n"


def assert_golden(path: Path, actual: str) -> None:
    """Compare ``actual`` with the golden file at ``path``; with the update flag, write it."""
    if update_requested():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != actual:
            path.write_text(actual, encoding="utf-8")
        return
    hint = f"if the change is intended, rerun with {UPDATE_ENV}=1 and review the diff of {path.name}"
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; {hint}", pytrace=False)
    expected = path.read_text(encoding="utf-8")
    if expected != actual:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                            fromfile=f"{path.name} (expected)", tofile=f"{path.name} (actual)"))
        pytest.fail(f"schedule differs from golden file {path}:\n{diff}\n{hint}", pytrace=False)
