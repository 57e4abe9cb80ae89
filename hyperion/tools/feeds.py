"""Random inputs for a model, for the CLI, the demo and the benchmarks."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from hyperion.errors import OptionError
from hyperion.ir import Graph
from hyperion.schedule import Schedule
from hyperion.units import MAX_TENSOR_BYTES

DEFAULT_DIM = 1  # what an unbound symbolic dim becomes when the user gave no shape


def _declared(source: Graph | Schedule) -> dict[str, tuple[str, tuple[int | str, ...] | None]]:
    """(dtype, shape) of every input, from the IR or from a schedule (which needs no import)."""
    if isinstance(source, Schedule):
        return {name: (source.tensors[name].dtype, source.input_shapes.get(name, source.tensors[name].shape))
                for name in source.graph_inputs}
    return {name: (source.tensors[name].dtype, source.tensors[name].shape) for name in source.inputs}


def input_shapes_of(source: Graph | Schedule,
                    given: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the graph inputs: ``given`` first, unbound symbolic dims as 1."""
    given = given or {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (_, shape) in _declared(source).items():
        if name in given:
            shapes[name] = tuple(int(d) for d in given[name])
            continue
        if shape is None:
            raise OptionError(f"input {name!r} has unknown rank; give its shape (--input-shape {name}=...)")
        shapes[name] = tuple(d if isinstance(d, int) else DEFAULT_DIM for d in shape)
    return shapes


def physical_memory_bytes() -> int | None:
    """The machine's RAM, where the OS says (None elsewhere)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def random_feeds(source: Graph | Schedule, shapes: Mapping[str, Sequence[int]], seed: int) -> dict[str, np.ndarray]:
    """Seeded random values: normal floats, integers in {0, 1} (valid indices), random bools.

    Refused before anything is allocated when they would not fit in the machine's memory."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    total, limit = 0, physical_memory_bytes()
    for name, (dtype, _) in _declared(source).items():
        shape = tuple(shapes[name])
        if any(d < 0 for d in shape) or math.prod(d for d in shape if d) > MAX_TENSOR_BYTES:
            raise OptionError(f"input {name!r}: cannot generate an array of shape {list(shape)}")
        total += math.prod(shape) * (np.dtype(dtype).itemsize if dtype in np.sctypeDict else 1)
        if limit is not None and total > limit:
            raise OptionError(f"input {name!r}: random inputs of shape {list(shape)} would need {total} bytes, more "
                              f"than this machine's memory ({limit}); give smaller shapes (--input-shape) or "
                              f"inputs from files (--input {name}=FILE.npy)")
        # np.asarray: for a scalar shape () numpy hands back a scalar, onnxruntime wants an array.
        if dtype == "bool":
            feeds[name] = np.asarray(rng.random(shape) < 0.5)
        elif dtype.startswith(("int", "uint")):
            feeds[name] = np.asarray(rng.integers(0, 2, size=shape), dtype=dtype)
        elif dtype.startswith(("float", "bfloat")):
            feeds[name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
        else:
            raise OptionError(f"input {name!r} has type {dtype}; pass it from a file (--input {name}=FILE.npy)")
    return feeds
