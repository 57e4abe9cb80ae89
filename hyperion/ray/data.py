"""A compiled model over a Ray Dataset: ``map_batches`` with a pool of actors, each under the cap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hyperion.api import compile as compile_model
from hyperion.errors import FeedError
from hyperion.frontend import ModelLike
from hyperion.tools.rss import peak_rss_bytes
from hyperion.units import parse_size


class ModelPredictor:
    """The callable each pool actor holds: the model compiled once in the actor, under the cap;
    new batch shapes (a smaller last batch) are planned on first use, under the same cap."""

    def __init__(self, model: ModelLike, memory_limit: int | None, mode: str, threads: int,
                 input_columns: Mapping[str, str] | None, input_shapes: Mapping[str, Sequence[int]] | None) -> None:
        self.baseline_bytes = peak_rss_bytes()
        self.model = compile_model(model, memory_limit=memory_limit, mode=mode, intra_op_num_threads=threads,
                                   input_shapes=input_shapes)
        self.columns = dict(input_columns or {})

    def _column(self, batch: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        column = self.columns.get(name, name)
        if column in batch:
            return batch[column]
        if len(batch) == 1 and len(self.model.input_names) == 1:
            return next(iter(batch.values()))
        raise FeedError(f"map_batches: no column {column!r} for model input {name!r}; columns are {list(batch)} "
                        "(map them with input_columns={input: column})")

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: np.ascontiguousarray(self._column(batch, name)) for name in self.model.input_names}
        outputs = self.model.run(feeds)
        outputs["hyperion_peak_rss_bytes"] = np.full(len(next(iter(outputs.values()))),
                                                     peak_rss_bytes() - self.baseline_bytes, dtype=np.int64)
        return outputs


def map_batches(dataset: Any, model: ModelLike, memory_limit: int | str | None = None, *, mode: str = "adaptive",
                concurrency: int = 1, batch_size: int | None = None, num_cpus: float = 1,
                input_columns: Mapping[str, str] | None = None,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> Any:
    """``dataset`` mapped through ``model``: a Ray Dataset of the model's outputs (and a column
    ``hyperion_peak_rss_bytes``: the actor's peak RSS above its post-import baseline when the
    batch was done), computed by ``concurrency`` actors, each holding the model compiled under
    ``memory_limit``. Columns feed the inputs of the same name (``input_columns`` maps
    others; a one-column dataset feeds a one-input model). Ray's ``memory=`` resource is set
    to the cap: it only admits actors; each keeps to its cap with Hyperion's plan."""
    cap = parse_size(memory_limit)
    options: dict[str, Any] = {"memory": cap} if cap else {}
    return dataset.map_batches(
        ModelPredictor, batch_size=batch_size, batch_format="numpy", concurrency=concurrency, num_cpus=num_cpus,
        fn_constructor_kwargs={"model": model, "memory_limit": cap, "mode": mode,
                               "threads": max(1, round(num_cpus)), "input_columns": input_columns,
                               "input_shapes": input_shapes}, **options)
