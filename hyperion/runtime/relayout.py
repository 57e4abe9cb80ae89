"""Relaid segments: fed convolutions prepared once by onnxruntime's optimizer.

onnxruntime runs a convolution fastest when its weight is a constant of the
session: its NCHWc transformer re-lays the weight in the channel blocks of the
MLAS kernels, and a following BatchNormalization (or Add, Mul) is folded into it.
A fed segment hands its weights over as inputs, so none of that happens and its
convolutions fall back to im2col and a GEMM -- about twice the time on the
corpus's CNNs.

A segment the schedule marks ``relaid`` is therefore built in two sessions, once:

1. its model with the fed weights as constants (references into their file) is
   given to onnxruntime at its full optimization level with
   ``optimized_model_filepath``: onnxruntime writes the optimized graph, and every
   initializer of 4 KiB or more -- the re-laid weights among them -- to a data file
   of its own (``session.optimized_model_external_initializers_file_name``). That
   session is dropped at once: building it held the weights as read plus their
   re-laid copy, which the plan counts as the segment's ``loading_bytes``;
2. the optimized model, its external initializers turned into graph inputs, is
   the segment's persistent session, built with optimizations off (they are done).

Every run then feeds the optimizer's weights exactly as plain fed weights are
fed: read-only views of the mapped data file, released after the segment.

onnxruntime marks such a file hardware-specific (the NCHWc block size follows the
CPU's vector width), so the files are cached per model bytes, data files,
onnxruntime version and CPU, under ``<cache>/relaid/<key>/``
(``HYPERION_CACHE_DIR``, default ``~/.cache/hyperion``): later processes on the
same machine skip step 1.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto

from hyperion.frontend.embedded import SMALL_INITIALIZER_BYTES, cache_dir
from hyperion.runtime.weights import FileSpan

log = logging.getLogger(__name__)

MODEL_FILE = "segment.onnx"
DATA_FILE = "segment.data"   # the optimizer's initializers: the only file a relaid model refers to


@dataclass(frozen=True)
class RelaidWeight:
    """One weight of a relaid segment, fed from the optimizer's data file on every run."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    span: FileSpan


@dataclass(frozen=True)
class RelaidModel:
    model: bytes                          # the optimized segment; its large weights are graph inputs
    weights: tuple[RelaidWeight, ...]


def relaid_model(segment_model: ModelProto, options: ort.SessionOptions, external_folder: Path,
                 disabled_optimizers: Sequence[str]) -> RelaidModel:
    """``segment_model`` (fed weights as constants) optimized by onnxruntime, from the cache
    or made now with ``options`` (whose optimization level is raised to the full one)."""
    serialized = segment_model.SerializeToString()
    folder = _cached_folder(serialized, segment_model, external_folder)
    if not (folder / MODEL_FILE).is_file():
        _optimize(serialized, options, disabled_optimizers, folder)
    return _fed_form(folder)


def _cached_folder(serialized: bytes, model: ModelProto, external_folder: Path) -> Path:
    digest = hashlib.sha256(serialized)
    for location in sorted(_external_locations(model)):
        stat = (external_folder / location).stat()
        digest.update(f"\0{location}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    digest.update(f"\0{ort.__version__}\0{_cpu()}".encode())
    return _root() / digest.hexdigest()


def _root() -> Path:
    """``<cache>/relaid``, or a folder of this user's under the system's temporary folder
    when the cache cannot be written (a read-only home): the files are remade there."""
    root = cache_dir() / "relaid"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK | os.X_OK):
            return root
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"hyperion-{os.getuid()}" / "relaid"
    fallback.mkdir(parents=True, exist_ok=True, mode=0o700)
    log.warning("%s cannot be written: relaid segments are cached in %s", root, fallback)
    return fallback


def _external_locations(model: ModelProto) -> set[str]:
    return {entry.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


@cache
def _cpu() -> str:
    """What the optimizer's choices depend on: the machine and its CPU's features."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}\0{platform.processor()}\0{flags}"


def _optimize(model: bytes, options: ort.SessionOptions, disabled_optimizers: Sequence[str],
              folder: Path) -> None:
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(building / MODEL_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(SMALL_INITIALIZER_BYTES))
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(disabled_optimizers))
        del session   # it held the weights and their re-laid copy: only the files are kept
        try:
            os.rename(building, folder)
        except OSError:   # another process cached the same segment first
            if not (folder / MODEL_FILE).is_file():
                raise
        else:
            log.info("relaid segment cached in %s", folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _fed_form(folder: Path) -> RelaidModel:
    """The cached optimized model with every external initializer turned into a graph input."""
    model = onnx.load_model_from_string((folder / MODEL_FILE).read_bytes())
    kept, weights = [], []
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            kept.append(tensor)
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        if info.get("location") != DATA_FILE:   # written by onnxruntime here: anything else is not ours
            raise OSError(f"{folder / MODEL_FILE}: initializer {tensor.name!r} refers to {info.get('location')!r}")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        span = FileSpan(folder / DATA_FILE, int(info.get("offset", 0)), int(info["length"]))
        weights.append(RelaidWeight(tensor.name, dtype, tuple(int(d) for d in tensor.dims), span))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(
        w.name, onnx.helper.np_dtype_to_tensor_dtype(w.dtype), list(w.shape)) for w in weights)
    return RelaidModel(model.SerializeToString(), tuple(weights))
