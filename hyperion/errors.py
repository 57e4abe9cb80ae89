"""Typed errors. Every failure Hyperion reports is a :class:`HyperionError`.

Messages name the file, node, tensor or option at fault and, where there is one,
what to do next. Every class has its own ``exit_code``: the status with which the
``hyperion`` command exits when it reports that error (docs/errors.md).
"""

from __future__ import annotations


class HyperionError(Exception):
    """Base class of every error Hyperion raises on purpose."""

    exit_code = 3


class OptionError(HyperionError, ValueError):
    """An option has a value Hyperion cannot use (a size, a mode, a shape). The command
    line exits with 2 for it, as for any other usage error argparse reports."""

    exit_code = 2


class ModelLoadError(HyperionError):
    """The model file is missing, not ONNX, or its external data is unusable."""

    exit_code = 4


class UnsafeModelError(ModelLoadError):
    """The model names external data outside its own folder (``..``, an absolute path,
    a symbolic link out of it): refused, never read. ``tensor`` and ``location`` say which."""

    exit_code = 5

    def __init__(self, message: str, *, tensor: str = "", location: str = "") -> None:
        super().__init__(message)
        self.tensor = tensor
        self.location = location


class ShapeError(HyperionError):
    """A tensor's shape cannot be determined, e.g. an unbound symbolic dim."""

    exit_code = 6


class UnsupportedModelError(HyperionError):
    """The model uses something Hyperion or onnxruntime cannot run."""

    exit_code = 7


class FeedError(HyperionError, ValueError):
    """A run was given inputs of the wrong name, shape or dtype."""

    exit_code = 8


class MemoryLimitError(HyperionError):
    """No plan fits the memory cap.

    ``needed_bytes`` is what the offending step needs; ``smallest_limit_bytes``
    the smallest cap for which a plan exists in the attempted mode.
    """

    exit_code = 9

    def __init__(self, message: str, *, node: str | None = None, needed_bytes: int = 0,
                 smallest_limit_bytes: int = 0) -> None:
        super().__init__(message)
        self.node = node
        self.needed_bytes = needed_bytes
        self.smallest_limit_bytes = smallest_limit_bytes


class PartitionError(MemoryLimitError):
    """No cut of the model into the requested pipeline stages fits the per-stage cap.

    ``smallest_stages`` is the fewest stages that fit the cap (0 when no number does:
    one step alone exceeds it); ``smallest_limit_bytes`` the smallest per-stage cap for
    which the requested number of stages fits."""

    exit_code = 16

    def __init__(self, message: str, *, smallest_stages: int = 0, smallest_limit_bytes: int = 0) -> None:
        super().__init__(message, smallest_limit_bytes=smallest_limit_bytes)
        self.smallest_stages = smallest_stages


class ObservedSizeError(MemoryLimitError):
    """A size only the data decides was observed at run time and cannot fit the cap:
    ``tensor`` is the tensor, ``size_bytes`` its observed size, ``memory_limit`` the cap.
    Another input (a smaller data-dependent size) or a larger cap runs."""

    exit_code = 19

    def __init__(self, message: str, *, tensor: str, size_bytes: int, memory_limit: int,
                 needed_bytes: int = 0) -> None:
        super().__init__(message, needed_bytes=needed_bytes or size_bytes)
        self.tensor = tensor
        self.size_bytes = size_bytes
        self.memory_limit = memory_limit


class ScheduleError(HyperionError):
    """A schedule file is malformed, of a newer format, or for another model."""

    exit_code = 10


class PassError(HyperionError):
    """A compiler pass failed or left the IR inconsistent."""

    exit_code = 11


class RuntimeExecutionError(HyperionError):
    """onnxruntime failed while executing a segment of the schedule."""

    exit_code = 12


class SchedulerError(HyperionError):
    """The seed API's forward scheduler was given a schedule it cannot run: an unknown
    layer or dependency type, a cycle, conflicting sizes, or a call out of order."""

    exit_code = 13


class SchedulerMemoryError(SchedulerError, MemoryLimitError):
    """A forward scheduler's plan does not fit its ``max_memory``; names the layer."""

    exit_code = 14


class StageFailedError(RuntimeExecutionError):
    """A pipeline stage (a Ray actor) died or did not answer in time; ``stage`` says which."""

    exit_code = 17

    def __init__(self, message: str, *, stage: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class MissingExtraError(HyperionError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""

    exit_code = 18


class OutputError(HyperionError):
    """A file Hyperion was asked to write cannot be written, or would replace one of the
    user's inputs (the model, its data files, the schedule being read, an input array)."""

    exit_code = 15


class CacheError(OutputError):
    """Hyperion's own cache folder (``HYPERION_CACHE_DIR``, default ``~/.cache/hyperion``)
    cannot take a file it must write there -- read-only, or without room -- or holds an
    entry that is not what Hyperion wrote. Names the folder or file."""

    exit_code = 20


#: Exit status of the command line for each error class (docs/errors.md); 1 is reserved
#: for ``run --check`` finding outputs that differ, 70 for an internal error (a bug: please
#: report it), 130 for Ctrl-C.
EXIT_CODES = {cls.__name__: cls.exit_code for cls in (
    HyperionError, OptionError, ModelLoadError, UnsafeModelError, ShapeError, UnsupportedModelError, FeedError,
    MemoryLimitError, ObservedSizeError, ScheduleError, PassError, RuntimeExecutionError, SchedulerError,
    SchedulerMemoryError, OutputError, CacheError, PartitionError, StageFailedError, MissingExtraError)}
