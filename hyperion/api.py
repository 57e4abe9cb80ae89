"""The Python API: ``compile``, ``load`` and :class:`CompiledModel`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import networkx as nx
import numpy as np

from hyperion.errors import FeedError, OptionError, ScheduleError
from hyperion.frontend import (
    ImportedModel,
    ModelLike,
    declared_input_shapes,
    import_model,
    load_source,
    require_bound,
    unbound_dims,
)
from hyperion.ir import ExecutionMode, Graph
from hyperion.planner import optimal_batch_size, parse_mode, plan
from hyperion.runtime import RunStats, Runtime, SessionConfig
from hyperion.schedule import Schedule
from hyperion.units import parse_size

log = logging.getLogger(__name__)

ShapeSignature = tuple[tuple[str, tuple[int, ...]], ...]
NON_TENSOR_DTYPES = frozenset({"sequence", "optional", "map", "sparse_tensor"})


class CompiledModel:
    """A model compiled for a mode and a memory cap; plans are cached per input shapes."""

    def __init__(self, imported: ImportedModel, mode: ExecutionMode, memory_limit: int | None,
                 max_segment_steps: int | None = None, session_config: SessionConfig | None = None,
                 schedule: Schedule | None = None, *, prefetch: bool = True,
                 weight_cache_bytes: int | None = None) -> None:
        self._base = imported
        self.mode = mode
        self.memory_limit = memory_limit
        self.max_segment_steps = max_segment_steps
        self.prefetch = prefetch
        self.weight_cache_bytes = weight_cache_bytes
        self.session_config = session_config or SessionConfig(enable_cpu_mem_arena=memory_limit is None,
                                                              return_freed_memory=memory_limit is not None)
        self._plans: dict[ShapeSignature, tuple[ImportedModel, Schedule, Runtime]] = {}
        self._static_shapes = not any(
            shape is None or any(isinstance(d, str) for d in shape)
            for shape in declared_input_shapes(imported.source).values())
        self._current: ShapeSignature | None = None
        # Sequences, optionals and maps have no shape to plan for: they stay out of the signature.
        self._sorted_inputs = tuple(sorted(name for name in imported.graph.inputs
                                           if imported.graph.tensors[name].dtype not in NON_TENSOR_DTYPES))
        if not unbound_dims(imported):
            self._current = _signature(imported.input_shapes)
            self._add_plan(self._current, imported, schedule)
        self._only_runtime = self._plans[self._current][2] if self._static_shapes else None

    # -- plans --------------------------------------------------------------------------
    def _add_plan(self, signature: ShapeSignature, imported: ImportedModel,
                  schedule: Schedule | None = None) -> None:
        schedule = schedule or plan(imported, self.mode, self.memory_limit, self.max_segment_steps,
                                    prefetch=self.prefetch, weight_cache_bytes=self.weight_cache_bytes,
                                    prepack_weights=self.session_config.prepack_weights)
        runtime = Runtime(imported.source, schedule, imported.value_types, self.session_config)
        self._plans[signature] = (imported, schedule, runtime)

    def _plan_for(self, signature: ShapeSignature) -> tuple[ImportedModel, Schedule, Runtime]:
        if signature not in self._plans:
            log.info("planning for new input shapes %s", dict(signature))
            self._add_plan(signature, import_model(self._base.source, dict(signature),
                                                   isolate_symbolic=self.memory_limit is not None))
        return self._plans[signature]

    def _active(self) -> tuple[ImportedModel, Schedule, Runtime]:
        if self._current is None:
            require_bound(self._base)
        return self._plans[self._current]

    @property
    def schedule(self) -> Schedule:
        """The plan for the input shapes of the last run (or those given at compile time)."""
        return self._active()[1]

    @property
    def ir(self) -> Graph:
        return self._active()[0].graph

    @property
    def graph(self) -> nx.MultiDiGraph:
        """The networkx graph: one node per ONNX node, edge attrs ``kind``, ``tensor``, ``bytes``."""
        return self.ir.nx

    @property
    def stats(self) -> RunStats:
        return self._active()[2].stats

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._base.graph.inputs

    @property
    def base_ir(self) -> Graph:
        """The IR as compiled: input dims bound by ``input_shapes``, the others symbolic."""
        return self._base.graph

    @property
    def source_label(self) -> str:
        return self._base.source.label

    # -- running ------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray],
            progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
        """Run the model; returns every graph output by name, as onnxruntime does.

        ``progress(done, total)`` is called after every segment a run goes through
        (every segment once per chunk when streaming)."""
        if self._only_runtime is not None:  # static shapes, one plan: the runtime checks the feeds
            runtime = self._only_runtime
        else:
            signature = self._feed_signature(feeds)
            _, _, runtime = self._plan_for(signature)
            self._current = signature
        if progress is None:
            return runtime.run(feeds)
        total, done = runtime.segment_runs, 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            progress(done, total)

        return runtime.run(feeds, advance)

    def _feed_signature(self, feeds: Mapping[str, np.ndarray]) -> ShapeSignature:
        """The feeds' shapes; new shapes are checked against the model's declared inputs."""
        try:
            signature = tuple((name, tuple(np.shape(feeds[name]))) for name in self._sorted_inputs)
        except KeyError as exc:
            raise FeedError(f"{self._base.source.label}: missing input {exc.args[0]!r}; inputs are "
                            f"{list(self._base.graph.inputs)}") from None
        if signature not in self._plans:
            self._check_declared_shapes(dict(signature))
        return signature

    def _check_declared_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        declared_shapes = declared_input_shapes(self._base.source)
        for name, shape in shapes.items():
            declared = declared_shapes.get(name)
            if declared is not None and (len(declared) != len(shape) or any(
                    isinstance(d, int) and d != s for d, s in zip(declared, shape))):
                raise FeedError(f"{self._base.source.label}: input {name!r} expects shape {list(declared)}, "
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
        imported = self._active()[0]
        return optimal_batch_size(imported, self.memory_limit, max_batch_size, mode=self.mode,
                                  input_bytes_per_sample=input_size, output_bytes_per_sample=output_size,
                                  prefetch=self.prefetch, prepack_weights=self.session_config.prepack_weights)

    def close(self) -> None:
        """Release every onnxruntime session (and the weights they hold)."""
        for _, _, runtime in self._plans.values():
            runtime.close()


def _signature(shapes: Mapping[str, Sequence[int | str]]) -> ShapeSignature:
    return tuple(sorted((name, tuple(shape)) for name, shape in shapes.items()))  # type: ignore[misc]


def compile(model: ModelLike, memory_limit: int | str | None = None, mode: str | ExecutionMode = "adaptive",
            input_shapes: Mapping[str, Sequence[int]] | None = None, *,
            max_segment_steps: int | None = None, whole_model_shortcut: bool = True,
            weight_cache: int | str | None = None, prefetch: bool | None = None,
            prepack_weights: bool = True) -> CompiledModel:
    """Import ``model``, run the passes and plan it under ``memory_limit``.

    ``memory_limit`` is bytes or a size string ("256MB", "1.5GiB"); ``None`` means
    no cap. ``input_shapes`` binds symbolic input dims; without it, dims are bound
    by the first run's feeds. ``max_segment_steps`` caps the steps per onnxruntime
    session (1 runs every node in its own session). ``whole_model_shortcut=False``
    builds segment models even when a single normal-mode segment could run the
    user's model untouched.

    ``weight_cache`` (bytes or a size string) bounds the sessions, with their
    weights, that memory_opt keeps alive across runs (``None``: as many as the
    cap allows; 0: none). ``prepack_weights=False`` stops onnxruntime from
    packing a copy of every MatMul/Gemm weight when a session is created:
    memory_opt sessions are then built about 15x faster and hold less, at the
    price of outputs that differ from plain onnxruntime's by float32 rounding
    (within twice its own error against float64, tested). ``prefetch`` builds the next
    segment's session while the current one computes (both are accounted);
    ``None``: only when weights are packed, since an unpacked session is built
    in about 2 ms and the double buffer would only take cap. See docs/memory.md.
    """
    if prefetch is None:
        prefetch = prepack_weights
    limit = parse_size(memory_limit)
    exec_mode = parse_mode(mode)
    # Under a cap, sympy (onnxruntime's symbolic shape inference) must not load here.
    imported = import_model(load_source(model), input_shapes, isolate_symbolic=limit is not None)
    cache_bytes = None if weight_cache is None else _cache_size(weight_cache)
    config = SessionConfig(enable_cpu_mem_arena=limit is None, whole_model_shortcut=whole_model_shortcut,
                           return_freed_memory=limit is not None, prepack_weights=prepack_weights)
    return CompiledModel(imported, exec_mode, limit, max_segment_steps, config, prefetch=prefetch,
                         weight_cache_bytes=cache_bytes)


def _cache_size(weight_cache: int | str) -> int:
    if weight_cache == 0:
        return 0
    return parse_size(weight_cache, option="weight_cache") or 0


def load(model: ModelLike, schedule: str | os.PathLike | Schedule, *, prepack_weights: bool = True) -> CompiledModel:
    """A compiled model from a saved schedule; refuses a schedule of another model.
    ``prepack_weights=False`` runs unpacked (see :func:`compile`); a schedule
    planned unpacked always runs unpacked."""
    loaded = schedule if isinstance(schedule, Schedule) else Schedule.load(schedule)
    source = load_source(model)
    label = str(schedule) if not isinstance(schedule, Schedule) else "<schedule>"
    if loaded.model.sha256 != source.sha256:
        raise ScheduleError(f"{label}: schedule is for another model (sha256 {loaded.model.sha256[:12]}…, "
                            f"{source.label} has {source.sha256[:12]}…); recompile it with hyperion compile")
    shapes = {k: [int(d) for d in v] for k, v in loaded.input_shapes.items() if all(isinstance(d, int) for d in v)}
    imported = import_model(source, shapes, isolate_symbolic=loaded.memory_limit is not None)
    mode = ExecutionMode(loaded.requested_mode)
    config = SessionConfig(enable_cpu_mem_arena=loaded.memory_limit is None,
                           return_freed_memory=loaded.memory_limit is not None, prepack_weights=prepack_weights)
    return CompiledModel(imported, mode, loaded.memory_limit, session_config=config, schedule=loaded)


__all__ = ["CompiledModel", "compile", "load"]
