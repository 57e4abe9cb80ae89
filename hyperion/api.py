"""The Python API: ``compile``, ``load`` and :class:`CompiledModel`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from hyperion.errors import FeedError, OptionError, ScheduleError
from hyperion.frontend import (
    ImportedModel,
    ModelLike,
    ModelSource,
    declared_input_shapes,
    fold_constants,
    import_model,
    load_source,
    require_bound,
    restrict_to_outputs,
    unbound_dims,
)
from hyperion.frontend.embedded import SMALL_INITIALIZER_BYTES
from hyperion.ir import ExecutionMode, Graph, TensorRole
from hyperion.planner import optimal_batch_size, parse_mode, plan
from hyperion.replan import ReplanRunner, ReplanStats, Runner, TracedReplan, runner_for
from hyperion.runtime import RunStats, Runtime, SessionConfig
from hyperion.schedule import Schedule, check_consistency
from hyperion.units import MAX_TENSOR_BYTES, parse_size

if TYPE_CHECKING:
    from hyperion.ir import NetworkxGraph
    from hyperion.runtime.tracing import Tracing

log = logging.getLogger(__name__)

ShapeSignature = tuple[tuple[str, tuple[int, ...]], ...]
OutputSet = frozenset[str]
NON_TENSOR_DTYPES = frozenset({"sequence", "optional", "map", "sparse_tensor"})


class _Plan(NamedTuple):
    """One plan of a compiled model: for one signature of input shapes."""

    imported: ImportedModel | None   # None: a loaded schedule, imported only when its graph is asked for
    schedule: Schedule
    runtime: Runner   # a Runtime, or a ReplanRunner for a schedule with re-plan points


class CompiledModel:
    """A model compiled for a mode and a memory cap; plans are cached per input shapes
    (and per set of requested outputs, see :meth:`run`).

    Built by :func:`compile` from an imported model, or by :func:`load` from a
    saved schedule alone (:meth:`from_schedule`): running a schedule needs only the
    user's model and the schedule. New input shapes are planned on first use,
    which imports the model for them.
    """

    def __init__(self, imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
                 max_segment_steps: int | None = None, session_config: SessionConfig | None = None, *,
                 prefetch: bool | None = None, weight_cache_bytes: int | None = None,
                 whole_model_shortcut: bool = True, prepack_weights: bool | None = None) -> None:
        self._setup(imported.source, mode, memory_limit, max_segment_steps, session_config, prefetch,
                    weight_cache_bytes, whole_model_shortcut, prepack_weights)
        self._base: ImportedModel | None = imported
        self._input_names = imported.graph.inputs
        self._sorted_inputs = _tensor_inputs(imported.graph.inputs, lambda n: imported.graph.tensors[n].dtype)
        if not unbound_dims(imported):
            self._current = self._signature_of(imported.input_shapes)
            self._add_plan(self._current, imported)
        self._only_runtime = self._plans[self._current].runtime if self._static_shapes else None

    @classmethod
    def from_schedule(cls, source: ModelSource, schedule: Schedule,
                      session_config: SessionConfig | None = None) -> CompiledModel:
        """A model that runs ``schedule``: no import, no shape inference, no pass."""
        model = cls.__new__(cls)
        config = session_config or SessionConfig.for_schedule(schedule)
        model._setup(source, schedule.requested_mode, schedule.memory_limit, None, config,
                     None, None, True, None if config.prepack_weights else False)
        model._base = None
        model._input_names = schedule.graph_inputs
        model._sorted_inputs = _tensor_inputs(schedule.graph_inputs, lambda n: schedule.tensors[n].dtype)
        model._current = model._signature_of(schedule.input_shapes)
        model._plans[model._current] = _Plan(None, schedule, model._runner(source, schedule))
        model._only_runtime = model._plans[model._current].runtime if model._static_shapes else None
        return model

    def _setup(self, source: ModelSource, mode: ExecutionMode, memory_limit: int | None,
               max_segment_steps: int | None, session_config: SessionConfig | None, prefetch: bool | None,
               weight_cache_bytes: int | None, whole_model_shortcut: bool, prepack_weights: bool | None) -> None:
        self._source = source
        self.mode = mode
        self.memory_limit = memory_limit
        self.max_segment_steps = max_segment_steps
        self.prefetch = prefetch
        self.prepack_weights = prepack_weights   # None: packed in normal mode, fed in the others
        self.weight_cache_bytes = weight_cache_bytes
        self.whole_model_shortcut = whole_model_shortcut
        self.session_config = session_config or SessionConfig(enable_cpu_mem_arena=memory_limit is None,
                                                              return_freed_memory=memory_limit is not None)
        self._plans: dict[ShapeSignature, _Plan] = {}
        # Plans of some outputs only (run(..., outputs=[...])): the subgraph they need.
        self._pruned: dict[tuple[ShapeSignature, OutputSet], _Plan] = {}
        self._current_outputs: OutputSet | None = None  # the last run's outputs when not all
        self.output_names = tuple(o.name for o in source.proto.graph.output)
        self._static_shapes = not any(
            shape is None or any(isinstance(d, str) for d in shape)
            for shape in declared_input_shapes(source).values())
        self._current: ShapeSignature | None = None
        self._tracing: Tracing | None = None

    # -- plans --------------------------------------------------------------------------
    def _signature_of(self, shapes: Mapping[str, Sequence[int | str]]) -> ShapeSignature:
        """What a plan is looked up by: the shapes of the tensor inputs, as feeds give them."""
        return tuple((name, tuple(shapes[name])) for name in self._sorted_inputs)  # type: ignore[misc]

    def _add_plan(self, signature: ShapeSignature, imported: ImportedModel) -> None:
        self._plans[signature] = self._new_plan(imported)

    def _new_plan(self, imported: ImportedModel) -> _Plan:
        schedule = plan(imported, self.mode, self.memory_limit, self.max_segment_steps,
                        prefetch=self.prefetch, weight_cache_bytes=self.weight_cache_bytes,
                        prepack_weights=self.prepack_weights)
        if schedule.whole_model and not self.whole_model_shortcut:
            # Recorded in the plan (a saved schedule keeps it): segment models even for one segment.
            schedule = dataclasses.replace(schedule, whole_model=False)
        return _Plan(imported, schedule, self._runner(imported.source, schedule))

    def _runner(self, source: ModelSource, schedule: Schedule) -> Runner:
        """The runtime of ``schedule``; for a re-planned one, the orchestration of hyperion.replan."""
        return runner_for(source, schedule, self.session_config, self._plan_rest,
                          isolate_symbolic=self.memory_limit is not None)

    def _plan_rest(self, imported: ImportedModel, memory_limit: int | None) -> Schedule:
        """The plan of the rest of a re-planned model (hyperion.replan), as this model plans."""
        schedule = plan(imported, self.mode, memory_limit, self.max_segment_steps, prefetch=self.prefetch,
                        weight_cache_bytes=self.weight_cache_bytes, prepack_weights=self.prepack_weights,
                        keep_heap=False)   # it shares the heap with the prefix's plan
        # The rest's model is built from the user's nodes, never the user's model file as a whole.
        return dataclasses.replace(schedule, whole_model=False)

    def _pruned_plan(self, signature: ShapeSignature, outputs: tuple[str, ...]) -> _Plan:
        """The plan of the subgraph ``outputs`` need, for ``signature`` (made on first use)."""
        key = (signature, frozenset(outputs))
        if key not in self._pruned:
            log.info("planning for outputs %s", list(outputs))
            imported = (self._imported(signature) if signature in self._plans else
                        import_model(self._source, dict(signature), isolate_symbolic=self.memory_limit is not None))
            self._pruned[key] = self._new_plan(restrict_to_outputs(imported, outputs))
        return self._pruned[key]

    def _plan_for(self, signature: ShapeSignature) -> _Plan:
        if signature not in self._plans:
            log.info("planning for new input shapes %s", dict(signature))
            self._add_plan(signature, import_model(self._source, dict(signature),
                                                   isolate_symbolic=self.memory_limit is not None))
        return self._plans[signature]

    def _active(self) -> _Plan:
        if self._current is None:
            assert self._base is not None  # a loaded model always has its schedule's plan
            require_bound(self._base)
        if self._current_outputs is not None:
            return self._pruned[(self._current, self._current_outputs)]
        return self._plans[self._current]

    def _active_imported(self) -> ImportedModel:
        """The imported model of the current plan (see :meth:`_imported`)."""
        active = self._active()
        if self._current_outputs is not None:
            assert active.imported is not None  # a pruned plan is made from its imported model
            return active.imported
        assert self._current is not None
        return self._imported(self._current)

    def _imported(self, signature: ShapeSignature) -> ImportedModel:
        """The imported model of a plan; a loaded schedule's model is imported now
        (once), with the schedule's input shapes and edge kinds."""
        entry = self._plans[signature]
        if entry.imported is None:
            imported = import_model(self._source, _int_shapes(entry.schedule.input_shapes),
                                    isolate_symbolic=self.memory_limit is not None)
            for edge in entry.schedule.edges:
                imported.graph.set_edge_kind(edge.src, edge.dst, edge.tensor, edge.kind)
            self._plans[signature] = entry = entry._replace(imported=imported)
        return entry.imported

    @property
    def schedule(self) -> Schedule:
        """The plan for the input shapes and outputs of the last run (or the shapes given at
        compile time, all outputs)."""
        return self._active().schedule

    @property
    def ir(self) -> Graph:
        """The IR of the current plan. For a loaded schedule the model is imported on
        first access (shape inference included); running never needs it."""
        return self._active_imported().graph

    @property
    def graph(self) -> NetworkxGraph:
        """The networkx graph: one node per ONNX node, edge attrs ``kind``, ``tensor``, ``bytes``
        (for a loaded schedule, built on first access: see :attr:`ir`)."""
        return self.ir.nx

    @property
    def stats(self) -> RunStats:
        return self._active().runtime.stats

    @property
    def replans(self) -> ReplanStats | None:
        """Run-time re-planning of the current plan (plans made, time per plan); None when
        the plan has no re-plan points (docs/dynamic_shapes.md)."""
        runtime = self._active().runtime
        return runtime.replans if isinstance(runtime, ReplanRunner) else None

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._input_names

    @property
    def base_ir(self) -> Graph:
        """The IR as compiled: input dims bound by ``input_shapes``, the others symbolic
        (for a loaded schedule, imported on first access with the schedule's shapes)."""
        if self._base is None:
            self._base = self._imported(next(iter(self._plans)))  # the loaded schedule's plan comes first
        return self._base.graph

    @property
    def imported(self) -> bool:
        """Whether the model's IR is in memory: compiled, or loaded and its graph asked for
        (a loaded schedule runs without it)."""
        return self._base is not None

    @property
    def source_label(self) -> str:
        return self._source.label

    # -- running ------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], progress: Callable[[int, int], None] | None = None, *,
            trace: str | os.PathLike | None = None,
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model; returns every graph output by name, as onnxruntime does.

        ``outputs``: return only these, in this order; only the part of the graph they
        need is planned (once per set of outputs and input shapes) and run: other
        branches are neither computed nor held. ``None`` (or empty) means every output.
        ``progress(done, total)`` is called after every segment a run goes through
        (every segment once per chunk when streaming). ``trace``: write a measured
        Chrome/Perfetto trace of this run there (see :meth:`tracing`)."""
        feeds = self._checked_feeds(feeds)
        if trace is not None:
            with self.tracing(trace):
                return self.run(feeds, progress, outputs=outputs)
        wanted = self._wanted_outputs(outputs)
        if wanted is not None:
            signature = self._current if self._only_runtime is not None else self._feed_signature(feeds)
            assert signature is not None  # static shapes: planned at compile time
            runtime = self._pruned_plan(signature, wanted).runtime
            self._current, self._current_outputs = signature, frozenset(wanted)
        elif self._only_runtime is not None:  # static shapes, one plan: the runtime checks the feeds
            runtime = self._only_runtime
            self._current_outputs = None
        else:
            signature = self._feed_signature(feeds)
            runtime = self._plan_for(signature).runtime
            self._current, self._current_outputs = signature, None
        if self._tracing is not None:
            runtime = (self._tracing.runtime_for(runtime) if isinstance(runtime, Runtime)
                       else runtime.traced(self._tracing))
        if outputs:  # as asked: in this order
            return _select(self._run(runtime, feeds, progress), outputs)
        return self._run(runtime, feeds, progress)

    def _wanted_outputs(self, outputs: Sequence[str] | None) -> tuple[str, ...] | None:
        """The distinct outputs asked for; None when they are all the model's."""
        if not outputs:
            return None
        if isinstance(outputs, str):
            raise FeedError(f"outputs: expected a list of output names, got the string {outputs!r}")
        wanted = tuple(dict.fromkeys(outputs))
        unknown = [name for name in wanted if name not in self.output_names]
        if unknown:
            raise FeedError(f"{self._source.label}: no output named {unknown[0]!r}; "
                            f"outputs are {list(self.output_names)}")
        return None if len(wanted) == len(self.output_names) else wanted

    @staticmethod
    def _run(runtime: Runner | TracedReplan, feeds: Mapping[str, np.ndarray],
             progress: Callable[[int, int], None] | None) -> dict[str, np.ndarray]:
        if progress is None:
            return runtime.run(feeds)
        total, done = runtime.segment_runs, 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            progress(done, total)

        return runtime.run(feeds, advance)

    @contextlib.contextmanager
    def tracing(self, path: str | os.PathLike, *, rss_interval_s: float = 0.002) -> Iterator[Tracing]:
        """Trace every run in the block into ``path`` (Chrome/Perfetto trace-event JSON), written
        when the block ends without an error: spans per run, chunk, segment and onnxruntime node,
        sessions built (weights read), prefetched, waited for and released, and counters of
        sampled RSS and the plan's accounted bytes. The traced runs use sessions built for
        tracing (onnxruntime's profiler on): the first run builds them. See docs/looking.md."""
        if self._tracing is not None:
            raise OptionError("tracing: this model is already being traced")
        from hyperion.runtime.tracing import Tracing  # a traced run only: no compile or plain run imports it
        self._tracing = Tracing(path, label=self._source.label, rss_interval_s=rss_interval_s)
        written = False
        try:
            yield self._tracing
            written = True
        finally:
            tracing, self._tracing = self._tracing, None
            tracing.close(write=written)

    def _checked_feeds(self, feeds: object) -> Mapping[str, np.ndarray]:
        """``feeds`` as a mapping of input names to arrays, checked at the boundary: names
        are strings, tensor inputs are arrays (or convert to one of numbers)."""
        if not isinstance(feeds, Mapping):
            raise FeedError(f"{self._source.label}: run() takes a dict of input name -> numpy array, got "
                            f"{type(feeds).__name__}; inputs are {list(self._input_names)}")
        checked = dict(feeds)
        for name, value in feeds.items():
            if not isinstance(name, str):
                raise FeedError(f"{self._source.label}: input names are strings, got {name!r}; "
                                f"inputs are {list(self._input_names)}")
            if name in self._sorted_inputs and not isinstance(value, np.ndarray):
                try:
                    checked[name] = array = np.asarray(value)
                except (ValueError, TypeError) as exc:
                    raise FeedError(f"input {name!r}: cannot use a {type(value).__name__} as an array "
                                    f"({exc})") from None
                if array.dtype == object:
                    raise FeedError(f"input {name!r}: expected a numpy array, got a {type(value).__name__}")
        return checked

    def _feed_signature(self, feeds: Mapping[str, np.ndarray]) -> ShapeSignature:
        """The feeds' shapes; new shapes are checked against the model's declared inputs."""
        try:
            signature = tuple((name, tuple(np.shape(feeds[name]))) for name in self._sorted_inputs)
        except KeyError as exc:
            raise FeedError(f"{self._source.label}: missing input {exc.args[0]!r}; inputs are "
                            f"{list(self._input_names)}") from None
        if signature not in self._plans:
            self._check_declared_shapes(dict(signature))
        return signature

    def _check_declared_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        declared_shapes = declared_input_shapes(self._source)
        for name, shape in shapes.items():
            declared = declared_shapes.get(name)
            if declared is not None and (len(declared) != len(shape) or any(
                    isinstance(d, int) and d != s for d, s in zip(declared, shape, strict=True))):
                raise FeedError(f"{self._source.label}: input {name!r} expects shape {list(declared)}, "
                                f"got {list(shape)}")

    def calculate_optimal_batch_size(self, input_size: int = 0, output_size: int = 0,
                                     max_batch_size: int = 1 << 20) -> int:
        """The largest batch <= ``max_batch_size`` whose plan fits the memory limit (0: none).

        Read off the plan of the current input shapes (activations scale with the
        batch, weights do not), in this model's mode (memory_opt for adaptive and
        streaming); ``input_size`` / ``output_size`` are bytes per sample of
        buffers the caller holds for the whole batch.
        """
        if self.memory_limit is None:
            raise OptionError("calculate_optimal_batch_size: the model was compiled without a memory_limit")
        return optimal_batch_size(self._active_imported(), self.memory_limit, max_batch_size, mode=self.mode,
                                  input_bytes_per_sample=input_size, output_bytes_per_sample=output_size,
                                  prefetch=self.prefetch, prepack_weights=self.prepack_weights)

    def close(self) -> None:
        """Release every onnxruntime session (and the weights they hold)."""
        for active in (*self._plans.values(), *self._pruned.values()):
            active.runtime.close()

    def __repr__(self) -> str:
        from hyperion.tools.notebook import compiled_model_repr  # tools sit on top of the core: imported late

        return compiled_model_repr(self)

    def _repr_html_(self) -> str:
        from hyperion.tools.notebook import compiled_model_html

        return compiled_model_html(self)


def _select(outputs: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: outputs[name] for name in names}


def _int_shapes(shapes: Mapping[str, Sequence[int | str]]) -> dict[str, list[int]]:
    """The fully bound shapes among ``shapes``, as ``import_model`` takes them."""
    return {name: [int(d) for d in shape] for name, shape in shapes.items() if all(isinstance(d, int) for d in shape)}


def _tensor_inputs(names: Sequence[str], dtype_of: Callable[[str], str]) -> tuple[str, ...]:
    """The inputs a plan is looked up by, sorted: sequences, optionals and maps have no shape."""
    return tuple(sorted(name for name in names if dtype_of(name) not in NON_TENSOR_DTYPES))


def compile(model: ModelLike, memory_limit: int | str | None = None, mode: str | ExecutionMode = "adaptive",
            input_shapes: Mapping[str, Sequence[int]] | None = None, *,
            max_segment_steps: int | None = None, whole_model_shortcut: bool = True,
            weight_cache: int | str | None = None, prefetch: bool | None = None,
            prepack_weights: bool | None = None, intra_op_num_threads: int = 0,
            base_dir: str | os.PathLike | None = None) -> CompiledModel:
    """Import ``model``, run the passes and plan it under ``memory_limit``.

    ``memory_limit`` is bytes or a size string ("256MB", "1.5GiB"); ``None`` means
    no cap. ``input_shapes`` binds symbolic input dims; without it, dims are bound
    by the first run's feeds. ``max_segment_steps`` caps the steps per onnxruntime
    session (1 runs every node in its own session). ``whole_model_shortcut=False``
    builds segment models even when a single normal-mode segment could run the
    user's model untouched.

    ``weight_cache`` (bytes or a size string) bounds the sessions, with their
    weights, that memory_opt keeps alive across runs (``None``: as many as the
    cap allows; 0: none). ``prepack_weights`` says how weights reach sessions:
    ``None`` (the default) pre-packs them in normal mode, whose sessions persist,
    and feeds them in memory_opt and streaming -- each segment's session built once,
    every run handing it the weights mapped from their file, uncopied, so that no
    run builds a session or packs a weight; ``True`` packs everywhere, as plain
    onnxruntime does (exact, but a streamed segment's session is rebuilt every
    run); ``False`` feeds everywhere. Fed or segmented outputs differ from plain
    onnxruntime's by float32 rounding, within twice its error against float64
    (tested; docs/memory.md says which modes are bit-exact). ``prefetch`` gets the
    next segment ready while the current one computes (a packed session built,
    both accounted; fed weights read ahead); ``None``: only when weights are
    packed.
    ``intra_op_num_threads`` sizes onnxruntime's thread pools (0: its default).

    ``base_dir`` is the folder holding the external data of a model given as bytes or
    a ``ModelProto`` (required when it has any); external data is only ever read from
    inside the model's folder (docs/errors.md).
    """
    limit = parse_size(memory_limit)
    exec_mode = parse_mode(mode)
    shapes = _checked_input_shapes(input_shapes)
    if max_segment_steps is not None and (isinstance(max_segment_steps, bool) or not isinstance(
            max_segment_steps, int) or max_segment_steps < 1):
        raise OptionError(f"max_segment_steps: expected a positive integer or None, got {max_segment_steps!r}")
    # Under a cap, sympy (onnxruntime's symbolic shape inference) must not load here.
    imported = import_model(load_source(model, base_dir), shapes, isolate_symbolic=limit is not None)
    cache_bytes = None if weight_cache is None else _cache_size(weight_cache)
    # The runtime packs where the schedule says it may; False forbids it everywhere.
    config = SessionConfig(enable_cpu_mem_arena=limit is None, return_freed_memory=limit is not None,
                           prepack_weights=prepack_weights is not False, intra_op_num_threads=intra_op_num_threads)
    return CompiledModel(imported, exec_mode, limit, max_segment_steps, config, prefetch=prefetch,
                         weight_cache_bytes=cache_bytes, whole_model_shortcut=whole_model_shortcut,
                         prepack_weights=prepack_weights)


def _checked_input_shapes(input_shapes: object) -> dict[str, list[int]] | None:
    """``input_shapes`` checked at the boundary: input names to sequences of non-negative
    integer dims, of at most MAX_TENSOR_BYTES elements."""
    if input_shapes is None:
        return None
    if not isinstance(input_shapes, Mapping):
        raise OptionError(f"input_shapes: expected a dict of input name -> dims, got {type(input_shapes).__name__}")
    shapes: dict[str, list[int]] = {}
    for name, dims in input_shapes.items():
        if not isinstance(name, str):
            raise OptionError(f"input_shapes: input names are strings, got {name!r}")
        if isinstance(dims, str | bytes) or not isinstance(dims, Sequence | np.ndarray):
            raise OptionError(f"input_shapes: input {name!r}: expected a list of dims, got {dims!r}")
        bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0]
        if bad:
            raise OptionError(f"input_shapes: input {name!r}: dims are non-negative integers, got {bad[0]!r} "
                              f"in {list(dims)}")
        shape = [int(d) for d in dims]
        if np.prod(shape, dtype=object) > MAX_TENSOR_BYTES:
            raise OptionError(f"input_shapes: input {name!r}: shape {shape} has more elements than Hyperion "
                              f"accepts ({MAX_TENSOR_BYTES})")
        shapes[name] = shape
    return shapes


def _cache_size(weight_cache: int | str) -> int:
    if weight_cache == 0:
        return 0
    return parse_size(weight_cache, option="weight_cache") or 0


def _computed_weights_planned(schedule: Schedule, source: ModelSource) -> tuple[bool, bool]:
    """Whether ``schedule`` was planned with weights import computes from constants
    (hyperion.frontend.fold), and with small ones among them: it names weights the model
    file does not hold. A schedule saved before import computed them (or the small ones)
    runs those nodes as they are."""
    initializers = {t.name for t in source.proto.graph.initializer}
    computed = [record for name, record in schedule.tensors.items()
                if record.role is TensorRole.WEIGHT and name not in initializers]
    return bool(computed), any((record.bytes or 0) <= SMALL_INITIALIZER_BYTES for record in computed)


def load(model: ModelLike, schedule: str | os.PathLike | Schedule, *, prepack_weights: bool = True,
         base_dir: str | os.PathLike | None = None) -> CompiledModel:
    """A compiled model that runs a saved schedule; refuses a schedule of another model.

    Reads the model (its nodes and weights; a large file's weights are located, not
    read) and runs what the schedule says: no graph import, no shape inference, no
    pass. Feeds of other shapes than the schedule's are planned on first use, as
    :func:`compile` does. ``prepack_weights=False`` runs unpacked (see
    :func:`compile`); a schedule planned unpacked always runs unpacked. The schedule
    is checked against the model before anything runs (:func:`~hyperion.schedule.check_consistency`).
    ``base_dir``: as for :func:`compile`.
    """
    if not isinstance(schedule, Schedule | str | os.PathLike):
        raise OptionError(f"schedule: expected a path or a hyperion.Schedule, got {type(schedule).__name__}")
    loaded = schedule if isinstance(schedule, Schedule) else Schedule.load(schedule)
    source = load_source(model, base_dir, fold_constants=False)
    label = str(schedule) if not isinstance(schedule, Schedule) else "<schedule>"
    if loaded.model.sha256 != source.sha256:
        raise ScheduleError(f"{label}: schedule is for another model (sha256 {loaded.model.sha256[:12]}…, "
                            f"{source.label} has {source.sha256[:12]}…); recompile it with hyperion compile")
    computed, small = _computed_weights_planned(loaded, source)
    if computed:
        source = fold_constants(source, small)
    check_consistency(loaded, source, label)
    config = SessionConfig.for_schedule(loaded, prepack_weights=prepack_weights and loaded.prepack_weights)
    return CompiledModel.from_schedule(source, loaded, config)


__all__ = ["CompiledModel", "compile", "load"]
