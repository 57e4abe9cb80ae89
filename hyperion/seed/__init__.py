"""The seed's Forward Pass Scheduler API in Python.

| seed (C)                               | hyperion.seed                                   |
| -------------------------------------- | ----------------------------------------------- |
| ``HyperionExecutionMode``              | :class:`ExecutionMode`                          |
| ``HyperionDependencyType``             | :class:`DependencyType`                         |
| ``HyperionExecLayer``                  | :class:`ExecLayer`                              |
| ``HyperionMmapConfig``                 | :class:`MmapConfig`, :func:`default_mmap_config` |
| ``hyperionOpenMappedModel``            | :func:`open_mapped_model` -> :class:`MappedModel` |
| ``hyperionCreateForwardScheduler``     | :class:`ForwardScheduler`                       |

See ``docs/seed_api.md`` for every function and the ported examples.
"""

from __future__ import annotations

from hyperion.errors import SchedulerError, SchedulerMemoryError
from hyperion.seed.mapped import MappedModel, open_mapped_model
from hyperion.seed.plan import LayerPlan, PlannedLayer
from hyperion.seed.scheduler import ForwardScheduler
from hyperion.seed.types import Dependency, DependencyType, ExecLayer, ExecutionMode, MmapConfig, default_mmap_config

__all__ = ["Dependency", "DependencyType", "ExecLayer", "ExecutionMode", "ForwardScheduler", "LayerPlan",
           "MappedModel", "MmapConfig", "PlannedLayer", "SchedulerError", "SchedulerMemoryError",
           "default_mmap_config", "open_mapped_model"]
