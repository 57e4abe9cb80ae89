"""Traced runs: a runtime built for tracing, and the trace file it leaves.

``CompiledModel.run(feeds, trace="run.json")`` and ``with cm.tracing("run.json"):``
run through a :class:`Tracing`. For every plan it runs, it builds a twin
:class:`~hyperion.runtime.executor.Runtime` whose sessions have onnxruntime's
profiler on and whose hooks record into one :class:`~hyperion.runtime.trace.TraceRecorder`
(an untraced runtime's sessions are built without the profiler, and kept across
runs, so they cannot be traced after the fact). The untraced runtime's sessions are
released first, so the process holds one set of sessions, as the plan counts. The
first traced run therefore builds its sessions (reads its weights); later runs in
the same ``tracing`` block reuse the kept ones, as untraced runs do.

A re-planned run (hyperion/replan.py) asks for one twin per plan it runs -- its prefix,
each rest -- named after the plan (``runtime_for(runtime, plan="rest 1")``): their spans
go into the same trace, named and tagged with the plan (:class:`~hyperion.runtime.trace.PlanRecorder`).

On :meth:`Tracing.close` the twins release their sessions (onnxruntime writes its
profiles then), the last run's stats become the model's, and the trace is written
atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hyperion.runtime.executor import Runtime
from hyperion.runtime.trace import RUN_TRACK, PlanRecorder, TraceRecorder
from hyperion.schedule import write_atomic


class TracedRuntime(Runtime):
    """A runtime whose runs, sessions and segments are recorded; each run is a span."""

    def run(self, feeds: Mapping[str, np.ndarray], progress: Callable[[int], None] | None = None
            ) -> dict[str, np.ndarray]:
        with self.tracer.span("run", "run", RUN_TRACK, mode=str(self.schedule.mode),
                              segments=len(self.schedule.segments)):
            return super().run(feeds, progress)


class Tracing:
    """Records the runs made while it is open; writes ``path`` on :meth:`close`."""

    def __init__(self, path: str | os.PathLike, *, label: str = "model", rss_interval_s: float = 0.002,
                 profile_nodes: bool = True) -> None:
        self.path = Path(path)
        self.label = label
        self.recorder = TraceRecorder(rss_interval_s=rss_interval_s, profile_nodes=profile_nodes)
        self._twins: dict[int, tuple[Runtime, TracedRuntime, str | None]] = {}
        self.trace: dict[str, Any] | None = None

    def runtime_for(self, runtime: Runtime, plan: str | None = None) -> TracedRuntime:
        """The traced twin of ``runtime`` (built on first use; ``runtime``'s sessions released);
        ``plan``: which plan of a re-planned run it runs (``prefix``, ``rest 1``, ...)."""
        entry = self._twins.get(id(runtime))
        if entry is None:
            runtime.close()
            twin = TracedRuntime(runtime.source, runtime.schedule, runtime.config)
            twin.tracer = twin.pool.tracer = self.recorder if plan is None else PlanRecorder(self.recorder, plan)
            entry = self._twins[id(runtime)] = (runtime, twin, plan)
        return entry[1]

    def close(self, *, write: bool = True) -> Path | None:
        """Release the traced sessions, hand their stats back, and write the trace."""
        unnamed = prefix = None   # the last schedule run untagged; a re-planned model's (its prefix's)
        plans = {}
        for original, twin, plan in self._twins.values():
            twin.close()
            original.stats = twin.stats
            if plan is None:
                unnamed = twin.schedule
            else:
                plans[plan] = (twin.schedule.steps, twin.schedule.segments)
                prefix = twin.schedule if plan == "prefix" else prefix
        self._twins.clear()
        schedule = unnamed or prefix
        metadata: dict[str, Any] = {"model": self.label}
        if schedule is not None:
            metadata.update(mode=str(schedule.mode), memory_limit=schedule.memory_limit,
                            peak_bytes=schedule.peak_bytes, segments=len(schedule.segments),
                            steps=len(schedule.steps))
        if plans:
            metadata["plans"] = list(plans)
        name = f"hyperion run: {Path(self.label).name}" + (f" ({schedule.mode})" if schedule is not None else "")
        self.trace = self.recorder.finish(steps=None if unnamed is None else unnamed.steps,
                                          segments=None if unnamed is None else unnamed.segments,
                                          metadata=metadata, process_name=name, plans=plans)
        if not write:
            return None
        return write_atomic(self.path, json.dumps(self.trace, separators=(",", ":")) + "\n")


__all__ = ["TracedRuntime", "Tracing"]
