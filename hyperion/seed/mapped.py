"""The seed's memory-mapped model: an ONNX model opened without reading its weights."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from hyperion.api import CompiledModel
from hyperion.errors import SchedulerError
from hyperion.frontend import ImportedModel, ModelLike, import_model, load_source
from hyperion.ir import ExecutionMode
from hyperion.seed.types import MmapConfig, default_mmap_config


class MappedModel:
    """An imported model: graph and tensor table in memory, external-data weights only
    located (file, offset, length), read when a step needs them."""

    def __init__(self, imported: ImportedModel, config: MmapConfig) -> None:
        self._imported: ImportedModel | None = imported
        self.config = config
        self.path: Path | None = imported.source.path

    @property
    def imported(self) -> ImportedModel:
        if self._imported is None:
            raise SchedulerError(f"{self.path or '<in-memory model>'}: the mapped model is closed")
        return self._imported

    @property
    def layer_count(self) -> int:
        """The seed's ``hyperionGetMappedLayerCount``: one layer per step of the compiled
        order, so one per graph node."""
        return len(self.imported.graph.nodes)

    def compile(self, mode: ExecutionMode, max_memory: int | None) -> CompiledModel:
        """The model compiled with one step per onnxruntime session, so a scheduler can
        run it layer by layer; ``MmapConfig.max_cache_size`` bounds the weight cache."""
        return CompiledModel(self.imported, mode, max_memory, max_segment_steps=1,
                             weight_cache_bytes=self.config.max_cache_size)

    def close(self) -> None:
        """The seed's ``hyperionCloseMappedModel``; closing twice is harmless."""
        self._imported = None

    @property
    def closed(self) -> bool:
        return self._imported is None

    def __enter__(self) -> MappedModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.layer_count} layers"
        return f"MappedModel({str(self.path or '<in-memory model>')!r}, {state})"


def open_mapped_model(path: ModelLike | str | os.PathLike, config: MmapConfig | None = None, *,
                      input_shapes: Mapping[str, Sequence[int]] | None = None) -> MappedModel:
    """The seed's ``hyperionOpenMappedModel(path, &cfg)``.

    ``input_shapes`` binds symbolic input dims (needed before the model's layers can
    be planned). Raises :class:`~hyperion.errors.ModelLoadError` for a missing or
    non-ONNX file.
    """
    config = (config or default_mmap_config()).validated()
    return MappedModel(import_model(load_source(path), input_shapes), config)


__all__ = ["MappedModel", "open_mapped_model"]
