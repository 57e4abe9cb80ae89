"""Hyperion: compile an ONNX model into an explicit schedule and run it under a memory cap."""

from __future__ import annotations

from hyperion.api import CompiledModel, compile, load
from hyperion.errors import (
                             CacheError,
                             FeedError,
                             HyperionError,
                             MemoryLimitError,
                             ModelLoadError,
                             ObservedSizeError,
                             OptionError,
                             OutputError,
                             PartitionError,
                             PassError,
                             RuntimeExecutionError,
                             ScheduleError,
                             ShapeError,
                             StageFailedError,
                             UnsafeModelError,
                             UnsupportedModelError,
)
from hyperion.ir import EdgeKind, ExecutionMode
from hyperion.planner.partition import Partition, partition
from hyperion.runtime import RunStats
from hyperion.schedule import Schedule
from hyperion.seed import (
                             DependencyType,
                             ExecLayer,
                             ForwardScheduler,
                             MappedModel,
                             MmapConfig,
                             SchedulerError,
                             SchedulerMemoryError,
                             default_mmap_config,
                             open_mapped_model,
)
from hyperion.session import InferenceSession
from hyperion.units import parse_size

__version__ = "0.1.0"

__all__ = [
    "CacheError", "CompiledModel", "EdgeKind", "ExecutionMode", "FeedError", "HyperionError", "InferenceSession",
    "MemoryLimitError", "ModelLoadError", "ObservedSizeError", "OptionError", "OutputError", "Partition",
    "PartitionError", "PassError", "RunStats", "StageFailedError",
    "RuntimeExecutionError", "Schedule", "ScheduleError", "ShapeError", "UnsafeModelError", "UnsupportedModelError",
    "compile", "load", "parse_size", "partition",
]
__all__ += ["DependencyType", "ExecLayer", "ForwardScheduler", "MappedModel", "MmapConfig", "SchedulerError",
            "SchedulerMemoryError", "default_mmap_config", "open_mapped_model"]  # the seed API
