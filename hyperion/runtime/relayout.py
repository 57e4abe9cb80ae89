"""Relaid segments: fed weights prepared once by onnxruntime, then mapped back pre-packed.

onnxruntime runs a segment fastest when its weights are constants of the session:
MLAS packs the B operand of every MatMul and Gemm into panels once instead of in
every call (BERT-base fed unpacked: 1.1-1.2x slower), its NCHWc transformer re-lays
convolution weights in the channel blocks of its kernels and folds a following
BatchNormalization in (a fed CNN: about twice slower). A segment whose weights do not
stay resident cannot simply hold them as constants -- the packed copies would stay on
the heap for the session's life.

A segment the schedule marks ``relaid`` is therefore built in two sessions, once:

1. its model with the fed weights as constants (references into their file) is
   given to onnxruntime at its full optimization level with
   ``optimized_model_filepath``, pre-packing on and
   ``session.save_external_prepacked_constant_initializers``: onnxruntime writes the
   optimized graph and every initializer of 4 KiB or more -- re-laid, and the packed
   panels too -- to a data file of its own
   (``session.optimized_model_external_initializers_file_name``). That session is
   dropped at once: building it held the packed copies, which the plan counts as
   the segment's ``loading_bytes``;
2. the optimized model, loaded from its file with optimizations off (they are done),
   is the segment's persistent session: onnxruntime *maps* the data file and its
   kernels use the packed panels where they lie, with no copy.

After every run the runtime drops the pages of that mapping from the process
(:mod:`hyperion.runtime.pages`), so RSS falls back exactly as for plainly fed
weights, while every kernel runs as in plain onnxruntime -- bit for bit the same
arithmetic as a session holding the weights.

onnxruntime marks such a file hardware-specific (the NCHWc block size and the packed
panels follow the CPU's vector width), so the files are cached per model bytes, data
files, onnxruntime version and CPU, under ``<cache>/relaid/<key>/``
(``HYPERION_CACHE_DIR``, default ``~/.cache/hyperion``): later processes on the same
machine skip step 1. The data file holds both the weights as read and their packed
copies: about twice the segment's weights on disk.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto

from hyperion.digest import sha256
from hyperion.frontend.embedded import SMALL_INITIALIZER_BYTES, cache_dir

log = logging.getLogger(__name__)

MODEL_FILE = "segment.onnx"
DATA_FILE = "segment.data"   # the optimizer's initializers: the only file a relaid model refers to
# Part of the cache key: files written by an earlier layout of the folder are never read.
LAYOUT = "prepacked-1"


@dataclass(frozen=True)
class RelaidModel:
    model: Path      # the optimized segment; its initializers (packed ones too) are in ``data``
    data: Path


def relaid_model(segment_model: ModelProto, options: ort.SessionOptions, external_folder: Path,
                 disabled_optimizers: Sequence[str], salt: str = "",
                 built_from: ModelProto | None = None) -> RelaidModel:
    """``segment_model`` (fed weights as constants) optimized by onnxruntime, from the cache
    or made now with ``options`` (pre-packing on; the optimization level is raised to the
    full one). ``salt`` tells apart what the model alone does not (which tile of a weight
    it declares); ``built_from``, the model to optimize when it is not the one the cache
    is keyed by (a tile's, its weight tile written to a file of its own)."""
    folder = _cached_folder(segment_model, external_folder, salt)
    if not (folder / MODEL_FILE).is_file():
        _optimize((built_from or segment_model).SerializeToString(), options, disabled_optimizers, folder)
    return _cached_model(folder)


def cached_relaid(segment_model: ModelProto, external_folder: Path, salt: str = "") -> RelaidModel | None:
    """What :func:`relaid_model` would return without optimizing anything, if it is cached."""
    folder = _cached_folder(segment_model, external_folder, salt)
    return _cached_model(folder) if (folder / MODEL_FILE).is_file() else None


def _cached_model(folder: Path) -> RelaidModel:
    _check_references(folder)
    return RelaidModel(folder / MODEL_FILE, folder / DATA_FILE)


def scratch_folder() -> tempfile.TemporaryDirectory[str]:
    """A folder of its own, on the cache's disk, for files a build reads once (a weight tile)."""
    return tempfile.TemporaryDirectory(prefix=".scratch-", dir=_root())


def _cached_folder(model: ModelProto, external_folder: Path, salt: str) -> Path:
    digest = sha256(model.SerializeToString() + salt.encode())
    for location in sorted(_external_locations(model)):
        path = external_folder / location
        if not path.exists():   # declared, never read (a tile of a weight kept in the proto): salted by the caller
            continue
        stat = path.stat()
        digest.update(f"\0{location}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    digest.update(f"\0{ort.__version__}\0{_cpu()}\0{LAYOUT}".encode())
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
        # The packed panels go into the data file too, and are mapped from it when loaded.
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
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


def _check_references(folder: Path) -> None:
    """The cached model refers to its own data file only: a file put there by anything
    else is not loaded."""
    model = onnx.load_model_from_string((folder / MODEL_FILE).read_bytes())
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
        if location != DATA_FILE:   # written by onnxruntime here: anything else is not ours
            raise OSError(f"{folder / MODEL_FILE}: initializer {tensor.name!r} refers to {location!r}")
