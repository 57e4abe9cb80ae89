"""What running one layer means: an abstract buffer, or the real node in onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from hyperion.api import CompiledModel
from hyperion.errors import FeedError
from hyperion.frontend import ImportedModel
from hyperion.planner import plan
from hyperion.runtime import Runtime, SessionConfig
from hyperion.schedule import Schedule
from hyperion.seed.plan import PlannedLayer


class LayerExecutor(Protocol):
    graph_inputs: tuple[str, ...]

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run(self, step: int, layer: PlannedLayer, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The layer's outputs by tensor name; ``values`` holds every tensor still held."""
        ...


class AbstractLayers:
    """Layers known only by their sizes (the seed's examples): running a layer gives
    it an output buffer of ``output_size`` bytes."""

    graph_inputs: tuple[str, ...] = ()

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feeds:
            raise FeedError(f"layers added by hand read no graph inputs, got feeds {sorted(feeds)}; "
                            "to run a model's real layers use ForwardScheduler.from_onnx(...)")
        return {}

    def run(self, step: int, layer: PlannedLayer, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.zeros(layer.output_bytes, dtype=np.uint8) for name in layer.outputs}


class OnnxLayers:
    """The layers of a schedule compiled with one step per segment: running layer i
    runs step i's node in its own onnxruntime session, through the runtime."""

    def __init__(self, imported: ImportedModel, schedule: Schedule, config: SessionConfig | None = None,
                 runtime: Runtime | None = None) -> None:
        self.schedule = schedule
        self.runtime = runtime or Runtime(imported.source, schedule, config)
        self.graph_inputs = schedule.graph_inputs

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runtime.check_feeds(feeds)

    def run(self, step: int, layer: PlannedLayer, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment = self.schedule.segment_of(step)
        return self.runtime.run_segment(segment, {name: values[name] for name in segment.inputs})


def per_step_plan(compiled: CompiledModel) -> tuple[ImportedModel, Schedule, Runtime]:
    """``compiled``'s model planned with one step per onnxruntime session. Reuses the
    compiled plan (and its runtime's sessions) when it already is."""
    _, schedule, runtime = compiled._active()  # the plan for the bound input shapes
    imported = compiled._active_imported()    # the layer plan reads the graph
    if all(segment.first_step == segment.last_step for segment in schedule.segments):
        return imported, schedule, runtime
    # keep_heap=False: batch sizes scale this plan's activations, and a kept heap would count as fixed bytes.
    schedule = plan(imported, compiled.mode, compiled.memory_limit, max_segment_steps=1, keep_heap=False)
    runtime = Runtime(imported.source, schedule, compiled.session_config)
    return imported, schedule, runtime


__all__ = ["AbstractLayers", "LayerExecutor", "OnnxLayers", "per_step_plan"]
