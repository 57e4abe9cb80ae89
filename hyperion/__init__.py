"""Hyperion: compile an ONNX model into an explicit schedule and run it under a memory cap.

``import hyperion`` loads what a compile and a run need (the front end, the passes, the
planner, the runtime): a process that compiles pays for them in the baseline of SPEC's
promise, not under its cap. Names that no compile or run needs — the seed API,
``partition`` and ``InferenceSession`` — are imported on first use (PEP 562), so neither
``import hyperion`` nor a capped run pays for them (docs/memory.md, "import").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
                             SchedulerError,
                             SchedulerMemoryError,
                             ShapeError,
                             StageFailedError,
                             UnsafeModelError,
                             UnsupportedModelError,
)
from hyperion.ir import EdgeKind, ExecutionMode
from hyperion.runtime import RunStats
from hyperion.schedule import Schedule
from hyperion.units import parse_size

if TYPE_CHECKING:
    from hyperion.planner.partition import Partition, partition
    from hyperion.seed import (
                                 DependencyType,
                                 ExecLayer,
                                 ForwardScheduler,
                                 MappedModel,
                                 MmapConfig,
                                 default_mmap_config,
                                 open_mapped_model,
    )
    from hyperion.session import InferenceSession

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "Partition": "hyperion.planner.partition", "partition": "hyperion.planner.partition",
    "InferenceSession": "hyperion.session",
    **dict.fromkeys(["DependencyType", "ExecLayer", "ForwardScheduler", "MappedModel", "MmapConfig",
                     "default_mmap_config", "open_mapped_model"], "hyperion.seed"),
}

__all__ = [
    "CacheError", "CompiledModel", "EdgeKind", "ExecutionMode", "FeedError", "HyperionError", "InferenceSession",
    "MemoryLimitError", "ModelLoadError", "ObservedSizeError", "OptionError", "OutputError", "Partition",
    "PartitionError", "PassError", "RunStats", "StageFailedError",
    "RuntimeExecutionError", "Schedule", "ScheduleError", "ShapeError", "UnsafeModelError", "UnsupportedModelError",
    "compile", "load", "parse_size", "partition",
]
__all__ += ["DependencyType", "ExecLayer", "ForwardScheduler", "MappedModel", "MmapConfig", "SchedulerError",
            "SchedulerMemoryError", "default_mmap_config", "open_mapped_model"]  # the seed API


def __getattr__(name: str) -> Any:
    """A lazily imported public name (PEP 562); kept in the module once imported."""
    if name not in _LAZY:
        raise AttributeError(f"module 'hyperion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
