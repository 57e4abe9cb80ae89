"""Measured traces of runs, as Chrome / Perfetto trace-event JSON.

The runtime calls a recorder at a few points -- a run, a streaming chunk, a
segment, a session built (which is when onnxruntime reads the segment's
weights), waited for or released -- and the recorder is :data:`NULL_RECORDER`,
which does nothing, unless the run is traced (:mod:`hyperion.runtime.tracing`).
A :class:`TraceRecorder` keeps:

* spans (``ph: X``) timed with ``time.perf_counter_ns``, each on a *track*
  (a ``tid`` of the trace): ``run`` for the caller's thread, ``sessions &
  weights`` for sessions built or waited for on it, ``prefetch`` for sessions
  built on the background thread, ``onnxruntime nodes`` for the per-node times
  of onnxruntime's own profiler;
* counters (``ph: C``): process RSS sampled from ``/proc/self/statm`` by a
  thread of its own, the plan's accounted bytes at every step, the bytes the
  plan counts for the weights of live sessions, the arrays Hyperion holds
  between segments;
* instants (``ph: i``): sessions released.

A re-planned run (hyperion/replan.py) runs several plans -- its prefix, then the rest
planned for what the data decided -- each with its own segments. Each writes through a
:class:`PlanRecorder`, which names its spans after the plan (``rest 1: segment 0``) and
tags them with it, so that :meth:`TraceRecorder.finish` reads every segment against the
schedule it belongs to.

onnxruntime's profiler is on only in sessions built while tracing (it costs a
little on every node). Its events are in microseconds since the session's
profiling start, which ``InferenceSession.get_profiling_start_time_ns()`` gives
on the system clock (``time.time_ns``); the recorder notes the offset between
that clock and ``perf_counter_ns`` once, and places onnxruntime's events on its
own clock with it. Each session writes its profile when it is destroyed, which
is why the trace is assembled (:meth:`TraceRecorder.finish`) after the traced
runtime released its sessions.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RUN_TRACK = "run"
SESSIONS_TRACK = "sessions & weights"
PREFETCH_TRACK = "prefetch"
NODES_TRACK = "onnxruntime nodes"
SAMPLER_THREAD = "hyperion-rss-sampler"
# Tracks in the order a viewer shows them.
TRACK_ORDER = (RUN_TRACK, SESSIONS_TRACK, PREFETCH_TRACK, NODES_TRACK)

RSS_COUNTER = "process RSS"
ACCOUNTED_COUNTER = "accounted bytes (plan)"
SESSION_WEIGHTS_COUNTER = "weights in live sessions (plan)"
HELD_COUNTER = "arrays held between segments"


class NullRecorder:
    """The recorder of an untraced runtime: every hook does nothing."""

    enabled = False

    def span(self, name: str, cat: str = "hyperion", track: str | None = None,
             **args: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def session_span(self, index: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def counter(self, name: str, value: float, track: str | None = None) -> None:
        pass

    def instant(self, name: str, cat: str = "hyperion", track: str | None = None, **args: Any) -> None:
        pass

    def session_options(self, options: Any, index: int) -> Any:
        return options

    def session_built(self, index: int, session: Any, held_bytes: int = 0) -> None:
        pass


NULL_RECORDER = NullRecorder()


@dataclass
class _Span:
    name: str
    cat: str
    track: str
    start_ns: int
    end_ns: int
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Profile:
    """An onnxruntime profile being written by one session built while tracing."""

    prefix: str
    segment: int
    start_wall_ns: int
    plan: str | None = None     # the plan of a re-planned run the segment belongs to


class TraceRecorder(NullRecorder):
    """Spans, counters and instants of traced runs; :meth:`finish` makes the trace."""

    enabled = True

    def __init__(self, *, rss_interval_s: float = 0.002, profile_nodes: bool = True) -> None:
        self._lock = threading.Lock()
        self._spans: list[_Span] = []
        self._counters: list[tuple[str, str, int, float]] = []        # name, track, ns, value
        self._instants: list[tuple[str, str, str, int, dict]] = []   # name, cat, track, ns, args
        self._profiles: list[_Profile] = []
        self._profile_dir = tempfile.mkdtemp(prefix="hyperion-trace-") if profile_nodes else None
        self._builds = 0
        self._session_weights = 0
        self._main = threading.main_thread()
        self.start_ns = time.perf_counter_ns()
        self._wall_offset_ns = _wall_offset_ns()
        self._sampler = _RssSampler(self, rss_interval_s)
        self._sampler.start()

    # -- clocks and tracks ---------------------------------------------------------------
    def now_ns(self) -> int:
        return time.perf_counter_ns()

    def wall_to_perf_ns(self, wall_ns: int) -> int:
        """A ``time.time_ns`` instant on this recorder's clock (``perf_counter_ns``)."""
        return wall_ns - self._wall_offset_ns

    @staticmethod
    def thread_track() -> str:
        thread = threading.current_thread()
        if thread is threading.main_thread():
            return RUN_TRACK
        if thread.name.startswith("hyperion-prefetch"):
            return PREFETCH_TRACK
        return thread.name

    # -- hooks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def span(self, name: str, cat: str = "hyperion", track: str | None = None, **args: Any) -> Iterator[None]:
        track = track or self.thread_track()
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            end = time.perf_counter_ns()
            with self._lock:
                self._spans.append(_Span(name, cat, track, start, end, args))

    def session_span(self, index: int, plan: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Building segment ``index``'s session (onnxruntime reads its weights then): on the
        sessions track when the run builds it, on the prefetch track when the background does."""
        track = self.thread_track()
        return self.span(_in_plan(f"build session {index}", plan), "session",
                         SESSIONS_TRACK if track == RUN_TRACK else track, segment=index, plan=plan)

    def counter(self, name: str, value: float, track: str | None = None) -> None:
        with self._lock:
            self._counters.append((name, track or "", time.perf_counter_ns(), value))

    def instant(self, name: str, cat: str = "hyperion", track: str | None = None, **args: Any) -> None:
        with self._lock:
            self._instants.append((name, cat, track or self.thread_track(), time.perf_counter_ns(), args))

    def session_options(self, options: Any, index: int) -> Any:
        """``options`` with onnxruntime's profiler on, writing into this recorder's folder."""
        if self._profile_dir is None:
            return options
        with self._lock:
            self._builds += 1
            number = self._builds
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(self._profile_dir, f"s{index}_{number}")
        return options

    def session_built(self, index: int, session: Any, held_bytes: int = 0, plan: str | None = None) -> None:
        """Note the session's profile (its clock) and when it is released, with the bytes the plan
        counts for its weights."""
        options = session.get_session_options()
        prefix = options.profile_file_prefix if options.enable_profiling else None
        if prefix:
            with self._lock:
                self._profiles.append(_Profile(prefix, index, session.get_profiling_start_time_ns(), plan))
        self._add_session_weights(held_bytes)
        weakref.finalize(session, self._released, index, held_bytes, plan)

    def _released(self, index: int, held_bytes: int, plan: str | None) -> None:
        self.instant(_in_plan(f"release session {index}", plan), "session", SESSIONS_TRACK, segment=index,
                     **({} if plan is None else {"plan": plan}))
        self._add_session_weights(-held_bytes)

    def _add_session_weights(self, delta: int) -> None:
        with self._lock:
            self._session_weights += delta
            value = self._session_weights
        self.counter(SESSION_WEIGHTS_COUNTER, value)

    # -- the trace -----------------------------------------------------------------------
    def stop(self) -> None:
        self._sampler.stop()

    def finish(self, *, steps: Sequence[Any] | None = None, segments: Sequence[Any] | None = None,
               metadata: Mapping[str, Any] | None = None, process_name: str = "hyperion",
               plans: Mapping[str, tuple[Sequence[Any], Sequence[Any]]] | None = None) -> dict[str, Any]:
        """The trace as a JSON-ready dict. Call after the traced sessions are released (their
        profiles are written then). ``steps``/``segments`` (a schedule's) add the plan's
        accounted bytes at every step onnxruntime timed and at every segment start; ``plans``
        gives the (steps, segments) of each named plan of a re-planned run."""
        self.stop()
        nodes = self._node_spans()
        spans = self._spans + nodes
        counters = list(self._counters)
        by_plan: dict[str | None, tuple[Sequence[Any], Sequence[Any]]] = dict(plans or {})
        if segments is not None and steps is not None:
            by_plan[None] = (steps, segments)
        counters += _accounted_counters(self._spans, nodes, by_plan)
        events = _trace_events(spans, counters, self._instants, self.start_ns, process_name)
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"source": "measured", "clock": "perf_counter, microseconds since trace start",
                              **(metadata or {})}}

    def _node_spans(self) -> list[_Span]:
        """onnxruntime's model runs and per-node kernel times, on this recorder's clock."""
        found: list[_Span] = []
        for profile in self._profiles:
            for path in sorted(glob.glob(glob.escape(profile.prefix) + "_*.json")):
                try:
                    with open(path, encoding="utf-8") as handle:
                        events = json.load(handle)
                except (OSError, ValueError):
                    continue  # a session still alive (never released) has written nothing yet
                base = self.wall_to_perf_ns(profile.start_wall_ns)
                for event in events:
                    name, cat = event.get("name", ""), event.get("cat", "")
                    if cat == "Session" and name == "model_run":
                        label = _in_plan(f"segment {profile.segment}: onnxruntime run", profile.plan)
                        span_cat, args = "onnxruntime", {}
                    elif cat == "Node" and name.endswith("_kernel_time"):
                        node_args = event.get("args", {})
                        label, span_cat = name.removesuffix("_kernel_time"), "node"
                        args = {"op": node_args.get("op_name"), "segment": profile.segment,
                                "provider": node_args.get("provider"),
                                "output_bytes": _int(node_args.get("output_size")),
                                "weight_bytes": _int(node_args.get("parameter_size"))}
                    else:
                        continue
                    args["plan"] = profile.plan
                    start = base + int(event["ts"]) * 1000
                    found.append(_Span(label, span_cat, NODES_TRACK, start, start + int(event["dur"]) * 1000, args))
        return _nested(found)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _wall_offset_ns() -> int:
    """``time_ns() - perf_counter_ns()``, taken over the tightest of a few readings."""
    best: tuple[int, int] | None = None
    for _ in range(5):
        before = time.perf_counter_ns()
        wall = time.time_ns()
        after = time.perf_counter_ns()
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    assert best is not None
    return best[1]


def _nested(spans: list[_Span]) -> list[_Span]:
    """``spans`` of one track (microsecond-rounded by onnxruntime) cut so that each either
    nests in the one before it or starts after it ends."""
    spans.sort(key=lambda s: (s.start_ns, -s.end_ns))
    stack: list[_Span] = []
    for span in spans:
        while stack and stack[-1].end_ns <= span.start_ns:
            stack.pop()
        if stack and span.end_ns > stack[-1].end_ns:
            span.end_ns = stack[-1].end_ns
        stack.append(span)
    return spans


def _accounted_counters(spans: list[_Span], nodes: list[_Span],
                        plans: Mapping[str | None, tuple[Sequence[Any], Sequence[Any]]]
                        ) -> list[tuple[str, str, int, float]]:
    """The plan's accounted bytes: at each segment's start (its first step's), then at every
    node onnxruntime timed under its own name; each span read against the plan it ran in
    (``plans``: (steps, segments) by plan name; None: the run's only plan)."""
    out = []
    for span in spans:
        plan = plans.get(span.args.get("plan"))
        if span.cat == "segment" and plan is not None:
            steps, segments = plan
            segment = segments[span.args["segment"]]
            out.append((ACCOUNTED_COUNTER, "", span.start_ns, steps[segment.first_step].live_bytes))
    by_name = {name: {step.node: step for step in steps} for name, (steps, _) in plans.items()}
    by_output = {name: {output: step for step in steps for output in step.outputs}
                 for name, (steps, _) in plans.items()}
    for span in nodes:
        plan_name = span.args.get("plan")
        if span.cat != "node" or plan_name not in plans:
            continue
        # onnxruntime keeps a node's name, or names a fused node after its output ("relu_out_nchwc").
        step = by_name[plan_name].get(span.name) or by_output[plan_name].get(span.name.removesuffix("_nchwc"))
        if step is not None:
            out.append((ACCOUNTED_COUNTER, "", span.start_ns, step.live_bytes))
    return out


def _in_plan(name: str, plan: str | None) -> str:
    """A span's name within one plan of a re-planned run ("rest 1: segment 0")."""
    return name if plan is None else f"{plan}: {name}"


def _trace_events(spans: list[_Span], counters: list[tuple[str, str, int, float]],
                  instants: list[tuple[str, str, str, int, dict]], origin_ns: int,
                  process_name: str) -> list[dict[str, Any]]:
    pid = os.getpid()
    tracks = list(TRACK_ORDER)
    for name in sorted({s.track for s in spans} | {i[2] for i in instants}):
        if name not in tracks:
            tracks.append(name)
    tid = {name: i + 1 for i, name in enumerate(tracks)}

    def us(ns: int) -> float:
        return round((ns - origin_ns) / 1e3, 3)

    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "ts": 0,
                                     "args": {"name": process_name}}]
    for name, number in tid.items():
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": number, "ts": 0, "args": {"name": name}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": number, "ts": 0,
                       "args": {"sort_index": number}})
    timed: list[dict[str, Any]] = []
    for span in spans:
        timed.append({"name": span.name, "cat": span.cat, "ph": "X", "ts": us(span.start_ns),
                      "dur": round((span.end_ns - span.start_ns) / 1e3, 3), "pid": pid, "tid": tid[span.track],
                      "args": {k: v for k, v in span.args.items() if v is not None}})
    for name, cat, track, ns, args in instants:
        timed.append({"name": name, "cat": cat, "ph": "i", "s": "t", "ts": us(ns), "pid": pid, "tid": tid[track],
                      "args": args})
    for name, _track, ns, value in counters:
        timed.append({"name": name, "ph": "C", "ts": us(ns), "pid": pid, "tid": 0, "args": {"bytes": value}})
    timed.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    return events + timed


class PlanRecorder(NullRecorder):
    """What one plan of a re-planned run records into the run's :class:`TraceRecorder`: the
    same hooks, each span named after the plan and tagged with it. The runtime's own run span
    becomes the plan's span (``prefix``, ``rest 1``: category ``plan``)."""

    enabled = True

    def __init__(self, recorder: TraceRecorder, plan: str) -> None:
        self.recorder, self.plan = recorder, plan

    def span(self, name: str, cat: str = "hyperion", track: str | None = None,
             **args: Any) -> contextlib.AbstractContextManager[None]:
        if cat == "run":
            return self.recorder.span(self.plan, "plan", track, plan=self.plan, **args)
        return self.recorder.span(_in_plan(name, self.plan), cat, track, plan=self.plan, **args)

    def session_span(self, index: int) -> contextlib.AbstractContextManager[None]:
        return self.recorder.session_span(index, plan=self.plan)

    def counter(self, name: str, value: float, track: str | None = None) -> None:
        self.recorder.counter(name, value, track)

    def instant(self, name: str, cat: str = "hyperion", track: str | None = None, **args: Any) -> None:
        self.recorder.instant(_in_plan(name, self.plan), cat, track, plan=self.plan, **args)

    def session_options(self, options: Any, index: int) -> Any:
        return self.recorder.session_options(options, index)

    def session_built(self, index: int, session: Any, held_bytes: int = 0) -> None:
        self.recorder.session_built(index, session, held_bytes, plan=self.plan)


class _RssSampler:
    """A thread that samples this process's resident set size every ``interval_s``, as a
    counter (a sample only when the value changed, and the first and last)."""

    def __init__(self, recorder: TraceRecorder, interval_s: float) -> None:
        self._recorder = recorder
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def read(self) -> int | None:
        try:
            with open("/proc/self/statm", "rb") as handle:
                return int(handle.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        if self._interval <= 0 or self.read() is None:
            return  # not Linux: no RSS track
        self._thread = threading.Thread(target=self._loop, name=SAMPLER_THREAD, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last = None
        while True:
            value = self.read()
            if value is not None and value != last:
                self._recorder.counter(RSS_COUNTER, value)
                last = value
            if self._stop.wait(self._interval):
                break
        value = self.read()
        if value is not None:
            self._recorder.counter(RSS_COUNTER, value)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


__all__ = ["ACCOUNTED_COUNTER", "HELD_COUNTER", "NODES_TRACK", "NULL_RECORDER", "PREFETCH_TRACK", "RSS_COUNTER",
           "RUN_TRACK", "SESSIONS_TRACK", "SESSION_WEIGHTS_COUNTER", "NullRecorder", "PlanRecorder", "TraceRecorder"]
