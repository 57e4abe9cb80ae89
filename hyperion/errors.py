"""Typed errors. Every failure Hyperion reports is a :class:`HyperionError`.

Messages name the file, node, tensor or option at fault and, where there is one,
what to do next.
"""

from __future__ import annotations


class HyperionError(Exception):
    """Base class of every error Hyperion raises on purpose."""


class OptionError(HyperionError, ValueError):
    """An option has a value Hyperion cannot use (a size, a mode, a shape)."""


class ModelLoadError(HyperionError):
    """The model file is missing, not ONNX, or its external data is unusable."""


class ShapeError(HyperionError):
    """A tensor's shape cannot be determined, e.g. an unbound symbolic dim."""


class UnsupportedModelError(HyperionError):
    """The model uses something Hyperion or onnxruntime cannot run."""


class FeedError(HyperionError, ValueError):
    """A run was given inputs of the wrong name, shape or dtype."""


class MemoryLimitError(HyperionError):
    """No plan fits the memory cap.

    ``needed_bytes`` is what the offending step needs; ``smallest_limit_bytes``
    the smallest cap for which a plan exists in the attempted mode.
    """

    def __init__(self, message: str, *, node: str | None = None, needed_bytes: int = 0,
                 smallest_limit_bytes: int = 0) -> None:
        super().__init__(message)
        self.node = node
        self.needed_bytes = needed_bytes
        self.smallest_limit_bytes = smallest_limit_bytes


class ScheduleError(HyperionError):
    """A schedule file is malformed, of a newer format, or for another model."""


class PassError(HyperionError):
    """A compiler pass failed or left the IR inconsistent."""


class RuntimeExecutionError(HyperionError):
    """onnxruntime failed while executing a segment of the schedule."""


class SchedulerError(HyperionError):
    """The seed API's forward scheduler was given a schedule it cannot run: an unknown
    layer or dependency type, a cycle, conflicting sizes, or a call out of order."""


class SchedulerMemoryError(SchedulerError, MemoryLimitError):
    """A forward scheduler's plan does not fit its ``max_memory``; names the layer."""
