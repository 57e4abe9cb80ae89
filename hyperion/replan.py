"""Run-time re-planning: run the prefix, observe, plan the rest (cached), run it.

A schedule with a ``replan`` record (planner/dynamic.py) plans only the prefix of
the model, up to the steps that decide sizes only the data knows. :class:`ReplanRunner`
carries the record out and decides nothing itself: the runtime runs the prefix; the
points' observed sizes are checked against what the prefix counted for them and the
cap (:class:`~hyperion.errors.ObservedSizeError` when they cannot fit); the rest of
the model is imported with the observed shapes and values bound
(:func:`~hyperion.frontend.suffix.import_suffix`) and planned by the normal planner
under the same cap, less the model outputs the prefix already made (held to the
end); that plan is kept per observed signature, so a second run with the same sizes
plans nothing. The rest may itself be re-planned (a size decided by another).

It sits above the runtime and the planner: ``api.CompiledModel`` builds one for a
re-planned schedule and calls it as it calls a :class:`~hyperion.runtime.Runtime`.

A traced run (:meth:`ReplanRunner.traced`) runs the traced twin of each plan
(:class:`~hyperion.runtime.tracing.Tracing`) and puts them in one trace: the ``run``
span holds the ``prefix`` span (its segments), a ``re-plan`` span (the observed sizes
checked, and on a cache miss the rest imported and planned, each a span of its own) and
the rest's span (``rest 1``: the first rest planned, and so on), in that order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import TypeProto

from hyperion.errors import MemoryLimitError, ObservedSizeError
from hyperion.frontend import ImportedModel, ModelSource
from hyperion.frontend.suffix import import_suffix, observed_nbytes
from hyperion.ir import TensorRole
from hyperion.runtime import RunStats, Runtime, SessionConfig
from hyperion.runtime.segment_model import type_proto
from hyperion.runtime.trace import NULL_RECORDER, RUN_TRACK, NullRecorder
from hyperion.schedule import Observe, Replan, Schedule
from hyperion.units import format_size

if TYPE_CHECKING:
    from hyperion.runtime.tracing import Tracing

log = logging.getLogger(__name__)

# The planner for the rest of the model: an imported model and a cap to a schedule.
PlanRest = Callable[[ImportedModel, int | None], Schedule]
Signature = tuple[tuple[str, Any], ...]


@dataclass
class ReplanStats:
    """What re-planning did, over the runner's lifetime and in the last run."""

    plans_made: int = 0                  # rest-of-model plans made (one per new observed signature)
    last_run_plans: int = 0              # of them, made by the last run
    replan_ms: list[float] = field(default_factory=list)  # time of each plan made (import + passes)
    signatures: list[Signature] = field(default_factory=list)


class ReplanRunner:
    """Runs a re-planned schedule: prefix, observation, the rest planned per signature."""

    def __init__(self, source: ModelSource, schedule: Schedule, config: SessionConfig, plan_rest: PlanRest,
                 *, isolate_symbolic: bool, known_values: frozenset[str] = frozenset(), plan: str = "") -> None:
        assert schedule.replan is not None  # only re-planned schedules come here
        self.source, self.schedule, self.config = source, schedule, config
        self.replan: Replan = schedule.replan
        self.prefix = Runtime(source, schedule, config)
        self._plan_rest = plan_rest
        self._isolate_symbolic = isolate_symbolic
        # Values an enclosing re-plan observed: fed to this schedule, and constants again for
        # the rest's shape inference (else the rest would wait for them once more).
        self._known_values = known_values
        self._rests: dict[Signature, tuple[str, Runner]] = {}   # with its name in a trace: "rest 1", ...
        self.plan = plan        # this runner's own name in a trace ("" at the top)
        self.replans = ReplanStats()
        self.stats = RunStats(mode=schedule.mode)
        self.last_rest: Runner | None = None

    @property
    def segment_runs(self) -> int:
        return self.prefix.segment_runs

    def traced(self, tracing: Tracing) -> TracedReplan:
        """This runner, its runs recorded into ``tracing`` (see module doc)."""
        return TracedReplan(self, tracing)

    def run(self, feeds: Mapping[str, np.ndarray], progress: Callable[[int], None] | None = None,
            tracing: Tracing | None = None) -> dict[str, Any]:
        if tracing is None or self.plan:  # a nested runner's span is the one its parent opened
            return self._run(feeds, progress, tracing)
        with tracing.recorder.span("run", "run", RUN_TRACK, mode=str(self.schedule.mode), replanned=True):
            return self._run(feeds, progress, tracing)

    def _run(self, feeds: Mapping[str, np.ndarray], progress: Callable[[int], None] | None,
             tracing: Tracing | None) -> dict[str, Any]:
        started = time.perf_counter()
        tracer: NullRecorder = NULL_RECORDER if tracing is None else tracing.recorder
        prefix = self.prefix if tracing is None else tracing.runtime_for(self.prefix, self._named("prefix"))
        carried = prefix.run(feeds, progress)
        observed = {**{name: feeds[name] for name in feeds}, **carried}
        self.replans.last_run_plans = 0
        if not self.replan.suffix_nodes:  # the deciding steps make the outputs: nothing to plan
            with tracer.span(self._named("re-plan"), "replan", RUN_TRACK, rest="none: the prefix made the outputs"):
                prefix_peak = self._check_observed(observed)
            self.stats = dataclasses.replace(prefix.stats, peak_bytes=prefix_peak,
                                             total_ms=1e3 * (time.perf_counter() - started))
            return {name: carried[name] for name in self.replan.outputs}
        signature = self._signature(observed)
        known = self._rests.get(signature)
        with tracer.span(self._named("re-plan"), "replan", RUN_TRACK, cache="miss" if known is None else "hit",
                         observed=self._describe(observed) if tracer.enabled else None):
            prefix_peak = self._check_observed(observed)
            if known is None:
                plan = self._named(f"rest {len(self._rests) + 1}")
                known = self._rests[signature] = (plan, self._plan(signature, observed, carried, plan, tracer))
        plan, rest = known
        self.last_rest = rest
        needed = set(rest.schedule.graph_inputs)
        rest_feeds = {name: observed[name] for name in needed}
        del observed
        outputs, rest_stats = self._run_rest(plan, rest, rest_feeds, progress, tracing)
        prefix_stats = prefix.stats
        held = self._held_bytes(carried, rest)
        self.stats = RunStats(self.schedule.mode, max(prefix_peak, rest_stats.peak_bytes + held),
                              max(prefix_stats.held_peak_bytes, rest_stats.held_peak_bytes + held),
                              [*prefix_stats.segment_ms, *rest_stats.segment_ms],
                              1e3 * (time.perf_counter() - started))
        return {name: outputs[name] if name in outputs else carried[name] for name in self.replan.outputs}

    def _run_rest(self, plan: str, rest: Runner, feeds: dict[str, Any], progress: Callable[[int], None] | None,
                  tracing: Tracing | None) -> tuple[dict[str, Any], RunStats]:
        """Run the rest (its traced twin, named ``plan``, when traced); its outputs and stats."""
        if tracing is None:
            return rest.run(feeds, progress), rest.stats
        if isinstance(rest, ReplanRunner):
            with tracing.recorder.span(plan, "plan", RUN_TRACK, plan=plan):
                return rest.run(feeds, progress, tracing), rest.stats
        twin = tracing.runtime_for(rest, plan)
        return twin.run(feeds, progress), twin.stats

    def _named(self, part: str) -> str:
        """``part``'s name in a trace, within this runner's own plan when it is a rest."""
        return f"{self.plan}/{part}" if self.plan else part

    # -- observation --------------------------------------------------------------------
    def _signature(self, observed: Mapping[str, Any]) -> Signature:
        """The sizes (and decisive values) the rest's plan depends on."""
        parts: list[tuple[str, Any]] = []
        for name in self.schedule.graph_outputs + tuple(n for n in self.schedule.graph_inputs if n in observed):
            parts.append((name, _shape_of(observed[name])))
        for point in self.replan.points:
            if point.observe is Observe.VALUE:
                parts.append((point.tensor, tuple(np.asarray(observed[point.tensor]).reshape(-1).tolist())))
        return tuple(parts)

    def _check_observed(self, observed: Mapping[str, Any]) -> int:
        """Every prefix step, with the observed sizes in place of what it counted, fits the cap;
        the prefix's accounted peak with them."""
        limit = self.schedule.memory_limit
        excess, decided, peak = 0, [], 0
        points = sorted((p for p in self.replan.points if p.observe is Observe.SHAPE), key=lambda p: p.step)
        position = 0
        for step in self.schedule.steps:
            while position < len(points) and points[position].step <= step.index:
                point = points[position]
                size = observed_nbytes(observed[point.tensor])
                excess += size - point.accounted_bytes
                decided.append((size, point.tensor))
                position += 1
            peak = max(peak, step.live_bytes + excess)
            if limit is not None and decided and step.live_bytes + excess > limit:
                size, tensor = max(decided)
                raise ObservedSizeError(
                    f"{self.source.label}: tensor {tensor!r} observed at {size} bytes ({format_size(size)}) cannot "
                    f"fit memory_limit {format_size(limit)} ({limit} bytes): step {step.index} (node {step.node!r}) "
                    f"would hold {step.live_bytes + excess} bytes", tensor=tensor, size_bytes=size,
                    memory_limit=limit, needed_bytes=step.live_bytes + excess)
        return max(peak, self.schedule.pinned_bytes)

    # -- the rest -----------------------------------------------------------------------
    def _plan(self, signature: Signature, observed: Mapping[str, Any], carried: Mapping[str, Any], plan: str,
              tracer: NullRecorder) -> Runner:
        started = time.perf_counter()
        by_value = frozenset(p.tensor for p in self.replan.points if p.observe is Observe.VALUE) | frozenset(
            name for name in self._known_values if name in observed)
        with tracer.span(self._named("import the rest"), "replan", RUN_TRACK, nodes=len(self.replan.suffix_nodes)):
            rest = import_suffix(self.source, self.replan.suffix_nodes, self.replan.outputs, observed, by_value,
                                 isolate_symbolic=self._isolate_symbolic, declared=self._declared_types(observed),
                                 constants=self._constants())
        limit = self.schedule.memory_limit
        held = sum(observed_nbytes(carried[name]) for name in self.replan.outputs
                   if name in carried and name not in rest.graph.inputs)
        rest_limit = None if limit is None else limit - held
        try:
            if rest_limit is not None and rest_limit < 1:
                raise MemoryLimitError(f"the outputs the prefix made hold {held} bytes")
            with tracer.span(self._named("plan the rest"), "replan", RUN_TRACK, memory_limit=rest_limit):
                schedule = self._plan_rest(rest, rest_limit)
        except MemoryLimitError as error:
            assert limit is not None
            tensor, size = _largest(rest)
            raise ObservedSizeError(
                f"{self.source.label}: with what this run observed ({self._describe(observed)}), the rest of the "
                f"model cannot fit memory_limit {format_size(limit)} ({limit} bytes): its largest tensor {tensor!r} "
                f"has {size} bytes ({format_size(size)}); {error}", tensor=tensor, size_bytes=size,
                memory_limit=limit, needed_bytes=error.needed_bytes) from None
        runner = runner_for(rest.source, schedule, self.config, self._plan_rest,
                            isolate_symbolic=self._isolate_symbolic, known_values=by_value,
                            plan=plan)
        elapsed = 1e3 * (time.perf_counter() - started)
        self.replans.plans_made += 1
        self.replans.last_run_plans += 1
        self.replans.replan_ms.append(elapsed)
        self.replans.signatures.append(signature)
        log.info("re-planned the rest of %s for %s in %.1f ms", self.source.label, self._describe(observed), elapsed)
        return runner

    def _constants(self) -> frozenset[str]:
        """The values observed that the model's own Constant nodes make (the data decides none of them)."""
        op_of = {step.index: step.op_type for step in self.schedule.steps}
        return frozenset(point.tensor for point in self.replan.points
                         if point.observe is Observe.VALUE and op_of.get(point.step) == "Constant")

    def _declared_types(self, observed: Mapping[str, Any]) -> dict[str, TypeProto]:
        """The types this schedule declares for what the rest may read: its inputs and what
        the prefix hands on."""
        records = {name: self.schedule.tensors[name].value_type for name in observed if name in self.schedule.tensors}
        return {name: type_proto(record) for name, record in records.items() if record is not None}

    def _describe(self, observed: Mapping[str, Any]) -> str:
        """The observed points, as a person reads them: ``n = 200``, ``idx: int64[1, 999]``."""
        parts = []
        for point in self.replan.points:
            value = observed[point.tensor]
            if point.observe is Observe.VALUE:
                parts.append(f"{point.tensor} = {np.asarray(value).tolist()}")
            elif isinstance(value, np.ndarray):
                parts.append(f"{point.tensor}: {value.dtype}{list(value.shape)}")
            else:
                parts.append(f"{point.tensor}: {observed_nbytes(value)} bytes")
        return ", ".join(parts)

    def _held_bytes(self, carried: Mapping[str, Any], rest: Runner) -> int:
        return sum(observed_nbytes(carried[name]) for name in self.replan.outputs
                   if name in carried and name not in rest.schedule.graph_inputs)

    def close(self) -> None:
        self.prefix.close()
        for _, rest in self._rests.values():
            rest.close()


Runner = Runtime | ReplanRunner


@dataclass(frozen=True)
class TracedReplan:
    """A :class:`ReplanRunner` whose runs go into a trace: what ``CompiledModel.run`` calls
    while tracing a re-planned model."""

    runner: ReplanRunner
    tracing: Tracing

    @property
    def segment_runs(self) -> int:
        return self.runner.segment_runs

    def run(self, feeds: Mapping[str, np.ndarray], progress: Callable[[int], None] | None = None
            ) -> dict[str, Any]:
        return self.runner.run(feeds, progress, self.tracing)


def runner_for(source: ModelSource, schedule: Schedule, config: SessionConfig, plan_rest: PlanRest, *,
               isolate_symbolic: bool, known_values: frozenset[str] = frozenset(), plan: str = "") -> Runner:
    """What runs ``schedule``: the runtime, or a re-plan runner when the schedule says so
    (``plan``: its name in a trace when it is the rest of another)."""
    if schedule.replan is None:
        return Runtime(source, schedule, config)
    return ReplanRunner(source, schedule, config, plan_rest, isolate_symbolic=isolate_symbolic,
                        known_values=known_values, plan=plan)


def _shape_of(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.shape)
    if isinstance(value, list | tuple):
        return tuple(_shape_of(v) for v in value)
    return type(value).__name__


def _largest(imported: ImportedModel) -> tuple[str, int]:
    sized = [(t.nbytes or 0, t.name) for t in imported.graph.tensors.values() if t.role is not TensorRole.WEIGHT]
    size, name = max(sized, default=(0, ""))
    return name, size


