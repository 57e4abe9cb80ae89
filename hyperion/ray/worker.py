"""One pipeline stage in one process: its model run from its schedule, under the stage's cap.

A plain class, so it runs (and is tested) without Ray; :class:`~hyperion.ray.RayPipeline`
makes it an actor. The process's peak RSS is reported above the baseline it had once Ray,
Hyperion and onnxruntime were imported (the stage's weights are read on its first run).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np

from hyperion.api import CompiledModel
from hyperion.errors import ScheduleError
from hyperion.frontend import load_source
from hyperion.runtime import SessionConfig
from hyperion.schedule import Schedule, check_consistency
from hyperion.tools.rss import peak_rss_bytes


class StageWorker:
    def __init__(self, index: int, model: bytes, schedule_json: str, base_dir: str, threads: int = 1) -> None:
        self.baseline_bytes = peak_rss_bytes()
        self.index = index
        schedule = Schedule.from_dict(json.loads(schedule_json), label=f"stage {index}")
        source = load_source(model, base_dir)
        if source.sha256 != schedule.model.sha256:
            raise ScheduleError(f"stage {index}: its schedule is of another model; partition the model again")
        check_consistency(schedule, source, f"stage {index}")
        config = dataclasses.replace(SessionConfig.for_schedule(schedule), intra_op_num_threads=threads)
        self.model = CompiledModel.from_schedule(source, schedule, config)
        self.inputs = schedule.graph_inputs

    def run(self, *received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stage's outputs, from what earlier stages and the caller sent it (merged)."""
        feeds: dict[str, np.ndarray] = {}
        for part in received:
            feeds.update(part)
        return self.model.run({name: feeds[name] for name in self.inputs})

    def peak_rss_bytes(self) -> int:
        """Peak RSS of this process above its post-import baseline."""
        return peak_rss_bytes() - self.baseline_bytes

    def pid(self) -> int:
        return os.getpid()

    def mode(self) -> str:
        return self.model.schedule.mode.value
