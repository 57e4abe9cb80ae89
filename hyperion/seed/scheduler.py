"""The seed's ``HyperionForwardScheduler`` in Python: :class:`ForwardScheduler`.

Layers come either from ``add_layer`` calls, as in the seed's examples, or from a
compiled ONNX model (``from_onnx`` / ``from_compiled``). Both are planned by the
same passes into a :class:`~hyperion.seed.plan.LayerPlan`; executing a layer then
releases whatever liveness marks unneeded right after it, so
``mark_output_unneeded`` is never required (it stays available, as in the seed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from hyperion.api import CompiledModel
from hyperion.errors import FeedError, MemoryLimitError, SchedulerError, SchedulerMemoryError
from hyperion.ir import ExecutionMode
from hyperion.planner import parse_mode
from hyperion.schedule import Schedule
from hyperion.seed.executors import AbstractLayers, LayerExecutor, OnnxLayers, per_step_plan
from hyperion.seed.hand import LayerTable, node_name, plan_hand_layers
from hyperion.seed.mapped import MappedModel, open_mapped_model
from hyperion.seed.plan import LayerPlan, PlannedLayer, onnx_layer_plan
from hyperion.seed.types import Dependency, ExecLayer, LayerOutput, MmapConfig
from hyperion.units import parse_size

log = logging.getLogger(__name__)


class ForwardScheduler:
    """Runs a network layer by layer, holding each output only while liveness needs it."""

    def __init__(self, model: MappedModel | None = None, mode: ExecutionMode | str = ExecutionMode.ADAPTIVE,
                 max_memory: int | str | None = None) -> None:
        self.model = model
        self.mode = parse_mode(mode)
        self.max_memory = parse_size(max_memory, option="max_memory")
        self._table = LayerTable()
        self._from_model = False
        self._plan: LayerPlan | None = None
        self._schedule: Schedule | None = None
        self._executor: LayerExecutor = AbstractLayers()
        self._layers: dict[int, ExecLayer] = {}
        self._planned: dict[int, PlannedLayer] = {}
        self._producer: dict[str, int] = {}        # tensor -> layer that writes it
        self._outputs: dict[str, np.ndarray] = {}  # layer outputs held now
        self._feeds: dict[str, np.ndarray] = {}    # graph inputs still needed
        self._step = 0
        self._peak_bytes = 0
        self._prepared = False

    # -- filled from a model --------------------------------------------------------------
    @classmethod
    def from_onnx(cls, path: str | os.PathLike | bytes, mode: ExecutionMode | str = ExecutionMode.ADAPTIVE,
                  max_memory: int | str | None = None,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  config: MmapConfig | None = None) -> ForwardScheduler:
        """A prepared scheduler with one layer per step of the model's compiled order."""
        scheduler = cls(open_mapped_model(path, config, input_shapes=input_shapes), mode, max_memory)
        scheduler.prepare()
        return scheduler

    @classmethod
    def from_compiled(cls, compiled: CompiledModel) -> ForwardScheduler:
        """A prepared scheduler running ``compiled``'s plan one step at a time."""
        scheduler = cls(None, compiled.mode, compiled.memory_limit)
        scheduler._load_compiled(compiled)
        scheduler.reset()
        return scheduler

    def _load_compiled(self, compiled: CompiledModel) -> None:
        imported, schedule, runtime = per_step_plan(compiled)
        self._from_model = True
        self._schedule = schedule
        self._install(onnx_layer_plan(imported, schedule), OnnxLayers(imported, schedule, runtime=runtime))

    # -- the seed's functions ---------------------------------------------------------------
    def add_layer(self, layer_index: int, depends_on: int, dep_type: object, output_size: int) -> None:
        """The seed's ``hyperionAddLayerToSchedule``; call again for each further dependency."""
        if self._from_model:
            raise SchedulerError("this scheduler's layers come from its model's compiled schedule; "
                                 "add_layer is for layers described by hand (ForwardScheduler(None, ...))")
        self._table.add(layer_index, depends_on, dep_type, output_size)
        record = self._layers.setdefault(layer_index, ExecLayer(layer_index, output_size=output_size,
                                                                name=node_name(layer_index)))
        deps = self._table.layers[layer_index].dependencies
        record.set_dependencies(tuple(Dependency(j, t) for j, t in sorted(deps.items())))
        self._plan, self._prepared = None, False

    def prepare(self, feeds: Mapping[str, np.ndarray] | None = None) -> None:
        """The seed's ``hyperionPrepareForwardPass``: plan the layers (raising
        :class:`SchedulerError` on an unknown layer or a cycle, and
        :class:`SchedulerMemoryError` on a plan over ``max_memory``), then start a pass."""
        self._ensure_plan()
        self.reset(feeds)

    def execute_next_layer(self, feeds: Mapping[str, np.ndarray] | None = None) -> int | None:
        """The seed's ``hyperionExecuteNextLayer``: run the next layer and return its
        index, or None when the pass is done. ``feeds`` (the graph inputs) go with the
        first call of a pass, unless given to prepare() or reset()."""
        self._require_prepared()
        if feeds is not None:
            if self._step > 0:
                raise FeedError("feeds go with the first layer of a pass; "
                                "call reset(feeds) to start a new one")
            self._feeds = self._executor.check_feeds(feeds)
        plan = self._require_plan()
        if self._step >= len(plan.layers):
            return None
        layer = plan.layers[self._step]
        self._check_ready(layer)
        self._outputs.update(self._executor.run(self._step, layer, {**self._feeds, **self._outputs}))
        self._layers[layer.index].executed = True
        self._peak_bytes = max(self._peak_bytes, self.memory_usage)
        self._release(plan.frees[self._step])  # liveness: unneeded right after this step
        self._sync(layer.index)
        self._step += 1
        return layer.index

    def reset(self, feeds: Mapping[str, np.ndarray] | None = None) -> None:
        """The seed's ``hyperionResetScheduler``: drop every output and start a new pass
        (``peak_memory_usage`` starts again from 0)."""
        self._require_plan()
        self._outputs, self._feeds = {}, {}
        self._step, self._peak_bytes = 0, 0
        for index in self._layers:
            self._layers[index].executed = False
            self._sync(index)
        if feeds is not None:
            self._feeds = self._executor.check_feeds(feeds)
        self._prepared = True

    def calculate_optimal_batch_size(self, input_size: int, output_size: int, max_batch_size: int) -> int:
        """The seed's ``hyperionCalculateOptimalBatchSize``: the largest batch b <=
        ``max_batch_size`` whose plan — per-sample activation bytes times b, plus b
        samples of ``input_size`` and ``output_size`` bytes — fits ``max_memory``."""
        for value, what, minimum in ((input_size, "input_size", 0), (output_size, "output_size", 0),
                                     (max_batch_size, "max_batch_size", 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise SchedulerError(f"{what}: expected an integer >= {minimum}, got {value!r}")
        plan = self._ensure_plan()
        batch = plan.optimal_batch_size(input_size, output_size, self.max_memory, max_batch_size)
        if batch < 1:
            needed = plan.batch_peak_bytes(1, input_size, output_size)
            raise SchedulerMemoryError(
                f"not even a batch of 1 fits max_memory {self.max_memory} bytes: it needs {needed} bytes",
                needed_bytes=needed, smallest_limit_bytes=needed)
        return batch

    @property
    def memory_usage(self) -> int:
        """The seed's ``hyperionGetSchedulerMemoryUsage``: bytes of layer outputs held now."""
        return sum(_nbytes(value) for value in self._outputs.values())

    @property
    def peak_memory_usage(self) -> int:
        """The seed's ``hyperionGetSchedulerPeakMemoryUsage``: the most bytes of layer
        outputs held at once in this pass, a layer's inputs and its new output included."""
        return self._peak_bytes

    def mark_output_unneeded(self, layer_index: int) -> None:
        """The seed's ``hyperionMarkLayerOutputUnneeded``. Liveness already releases every
        output after its last reader, so this only ever releases one earlier."""
        record = self._layer(layer_index)
        if not record.executed:
            raise SchedulerError(f"layer {layer_index} has not run yet; "
                                 "mark its output unneeded after it runs")
        self._release(self._planned[layer_index].outputs)
        self._sync(layer_index)

    def is_layer_executed(self, layer_index: int) -> bool:
        return self._layer(layer_index).executed

    def get_layer_output(self, layer_index: int) -> LayerOutput | None:
        """The layer's output array (a tuple for several outputs); None before it runs
        and once it is released."""
        return self._layer(layer_index).output

    @property
    def layers(self) -> list[ExecLayer]:
        """Every layer's :class:`ExecLayer`, by layer index."""
        return [self._layers[i] for i in sorted(self._layers)]

    # -- beyond the seed ------------------------------------------------------------------
    @property
    def plan(self) -> LayerPlan:
        return self._ensure_plan()

    @property
    def schedule(self) -> Schedule | None:
        """The compiled schedule the layers come from (None for layers added by hand)."""
        return self._schedule

    def outputs(self) -> dict[str, np.ndarray]:
        """The pass's results by name (for an ONNX model, its graph outputs)."""
        plan = self._require_plan()
        if not self._prepared or self._step < len(plan.layers):
            left = len(plan.layers) - self._step
            raise SchedulerError(f"the pass is not finished: {left} layers still to run")
        released = [name for name in plan.graph_outputs if name not in self._outputs]
        if released:
            raise SchedulerError(f"output {released[0]!r} was released by mark_output_unneeded "
                                 f"(layer {self._producer.get(released[0])})")
        return {name: self._outputs[name] for name in plan.graph_outputs}

    # -- internals --------------------------------------------------------------------------
    def _ensure_plan(self) -> LayerPlan:
        if self._plan is None:
            if self._table.layers:
                self._install(plan_hand_layers(self._table, self.mode, self.max_memory), AbstractLayers())
            elif self.model is not None:
                self._load_compiled(self._compile_model(self.model))
            else:
                raise SchedulerError("no layers to schedule: add them with add_layer(...) or give a model")
        return self._require_plan()

    def _compile_model(self, model: MappedModel) -> CompiledModel:
        try:
            return model.compile(self.mode, self.max_memory)
        except MemoryLimitError as exc:
            raise SchedulerMemoryError(
                f"the model's plan does not fit max_memory (layer i is step i of its schedule): {exc}",
                node=exc.node, needed_bytes=exc.needed_bytes, smallest_limit_bytes=exc.smallest_limit_bytes,
            ) from None

    def _install(self, plan: LayerPlan, executor: LayerExecutor) -> None:
        self._plan, self._executor = plan, executor
        self._planned = plan.by_index()
        self._producer = {t: layer.index for layer in plan.layers for t in layer.outputs}
        for layer in plan.layers:
            record = self._layers.setdefault(layer.index, ExecLayer(layer.index, name=layer.node))
            record.set_dependencies(layer.dependencies)
            record.output_size, record.released_after = layer.output_bytes, layer.released_after
        log.debug("planned %d layers, peak %d bytes", len(plan.layers), plan.peak_bytes)

    def _require_plan(self) -> LayerPlan:
        if self._plan is None:
            raise SchedulerError("the layers are not planned yet: call prepare() first")
        return self._plan

    def _require_prepared(self) -> None:
        if not self._prepared:
            raise SchedulerError("call prepare() before executing layers (and again after add_layer)")

    def _layer(self, layer_index: int) -> ExecLayer:
        if layer_index not in self._layers:
            raise SchedulerError(f"no layer {layer_index}; the layers are {sorted(self._layers)}")
        return self._layers[layer_index]

    def _check_ready(self, layer: PlannedLayer) -> None:
        for tensor in layer.reads:
            if tensor in self._producer and tensor not in self._outputs:
                source = self._producer[tensor]
                raise SchedulerError(f"layer {layer.index} reads the output of layer {source}, released "
                                     f"early by mark_output_unneeded({source}); mark an output unneeded only "
                                     "after its last reader has run")
            if tensor not in self._producer and tensor not in self._feeds:
                raise FeedError(f"layer {layer.index} (node {layer.node!r}) reads graph input {tensor!r}: "
                                f"pass the graph inputs {list(self._executor.graph_inputs)} to "
                                "prepare(feeds), reset(feeds) or the first execute_next_layer(feeds)")

    def _release(self, tensors: Sequence[str]) -> None:
        for name in tensors:
            self._outputs.pop(name, None)
            self._feeds.pop(name, None)
            if name in self._producer:
                self._sync(self._producer[name])

    def _sync(self, layer_index: int) -> None:
        """Bring the layer's ExecLayer in line with what is held."""
        record = self._layers[layer_index]
        outputs = self._planned[layer_index].outputs if layer_index in self._planned else ()
        held = [self._outputs.get(name) for name in outputs]
        record.memory_usage = sum(_nbytes(value) for value in held if value is not None)
        record.output_needed = not record.executed or any(value is not None for value in held)
        if not any(value is not None for value in held):
            record.output = None
        else:
            record.output = held[0] if len(held) == 1 else tuple(held)

    def __repr__(self) -> str:
        source = "hand" if self._table.layers else "model" if self._from_model or self.model else "empty"
        return (f"ForwardScheduler({len(self._layers)} layers from {source}, mode={self.mode.value}, "
                f"max_memory={self.max_memory}, next step {self._step})")


def _nbytes(value: object) -> int:
    return int(getattr(value, "nbytes", 0))


__all__ = ["ForwardScheduler"]
