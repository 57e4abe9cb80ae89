"""The seed API's types: its two enums, the per-layer record and the mmap configuration."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hyperion.errors import SchedulerError
from hyperion.ir import EdgeKind, ExecutionMode

DEFAULT_CACHE_BYTES = 64 * 2**20

LayerOutput = np.ndarray | tuple[np.ndarray | None, ...]


class DependencyType(str, enum.Enum):
    """The seed's ``HyperionDependencyType``; one-to-one with :class:`~hyperion.ir.EdgeKind`."""

    NONE = "none"
    SEQUENTIAL = "sequential"
    RESIDUAL = "residual"
    ATTENTION = "attention"

    @classmethod
    def from_edge_kind(cls, kind: EdgeKind | str) -> DependencyType:
        return cls(EdgeKind(kind).value)

    def to_edge_kind(self) -> EdgeKind:
        return EdgeKind(self.value)

    @classmethod
    def parse(cls, value: object) -> DependencyType:
        """A member from itself, an ``EdgeKind``, a name ("residual", "RESIDUAL",
        "HYPERION_DEP_RESIDUAL") or the seed's enum value (0-3)."""
        if isinstance(value, DependencyType):
            return value
        if isinstance(value, EdgeKind):
            return cls.from_edge_kind(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(cls):
            return list(cls)[value]  # the C enum's order: NONE, SEQUENTIAL, RESIDUAL, ATTENTION
        if isinstance(value, str):
            name = value.strip().lower().removeprefix("hyperion_dep_")
            if name in cls._value2member_map_:
                return cls(name)
        raise SchedulerError(f"unknown dependency type {value!r}; use one of "
                             f"{', '.join('DependencyType.' + m.name for m in cls)}")

    @property
    def precedence(self) -> int:
        """When one layer reads another through several edges, the strongest kind names
        the dependency, as classify_edges ranks them: attention > residual > sequential."""
        return list(DependencyType).index(self)


class Dependency(NamedTuple):
    layer: int
    dep_type: DependencyType


@dataclass(eq=False)
class ExecLayer:
    """The seed's ``HyperionExecLayer``: one layer's place in the schedule and its state.

    ``depends_on_layer`` / ``dep_type`` are the layer's first dependency (lowest layer
    index), as the seed's struct holds one; ``dependencies`` lists them all.
    ``memory_usage`` is the bytes of this layer's output held right now.
    """

    layer_index: int
    dep_type: DependencyType = DependencyType.NONE
    depends_on_layer: int = -1
    executed: bool = False
    output_needed: bool = True
    memory_usage: int = 0
    output: LayerOutput | None = None
    output_size: int = 0
    dependencies: tuple[Dependency, ...] = ()
    released_after: int | None = None   # the layer after whose step liveness releases this output
    name: str | None = None             # the graph node (ONNX layers) or "layer<i>"

    def set_dependencies(self, dependencies: tuple[Dependency, ...]) -> None:
        self.dependencies = dependencies
        first = dependencies[0] if dependencies else Dependency(-1, DependencyType.NONE)
        self.depends_on_layer, self.dep_type = first


@dataclass
class MmapConfig:
    """The seed's ``HyperionMmapConfig``. ``max_cache_size``: bytes of weights kept
    resident for reuse in ``memory_opt`` mode. Mutable, so the seed's
    ``cfg.maxCacheSize = ...`` ports as ``cfg.max_cache_size = ...``."""

    max_cache_size: int = DEFAULT_CACHE_BYTES

    def validated(self) -> MmapConfig:
        size = self.max_cache_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise SchedulerError(f"MmapConfig.max_cache_size: expected a byte count >= 0, got {size!r}")
        return self


def default_mmap_config() -> MmapConfig:
    """The seed's ``hyperionCreateDefaultMmapConfig()``."""
    return MmapConfig()


__all__ = ["DEFAULT_CACHE_BYTES", "Dependency", "DependencyType", "ExecLayer", "ExecutionMode",
           "LayerOutput", "MmapConfig", "default_mmap_config"]
