"""Weights computed from constants, made real weights at import.

Some models ship without their weights' values: each weight is computed when the model
runs, from constants alone -- ``ConstantOfShape(shape initializer, value=...)`` in onnx's
light models, a ``Transpose`` or ``Cast`` of a weight elsewhere. onnxruntime folds such
nodes when it builds a session and holds the results for the session's life; a capped
plan that counted them as activations would have its sessions compute them on every run,
and could never stream them. So import computes them once and writes the large ones into
Hyperion's weight cache, ``<cache>/weights/<model sha256>/folded-<layout digest>.bin``
(:func:`hyperion.frontend.embedded.weights_folder`; ``HYPERION_CACHE_DIR`` moves it): the
IR then sees weights, which the planner counts, streams, feeds, packs and tiles as any other.

The rules, applied in the model's node order (ONNX lists nodes topologically):

1. A tensor is constant when it is an initializer that cannot be overridden (not also a
   graph input from IR version 4 on: onnxruntime's rule), a ``Constant``'s output, or the
   output of a node computed here.
2. ``ConstantOfShape`` of a constant shape is computed as its one fill value; when its
   output is larger than ``SMALL_INITIALIZER_BYTES`` it is written in chunks of
   ``FILL_CHUNK_BYTES``, never held whole in memory.
3. A node of ``EVALUATED_OPS`` whose inputs are all constant and whose output -- bounded
   from its inputs' shapes before anything runs -- fits ``EVALUATED_MAX_BYTES`` is
   evaluated by onnxruntime: the kernel its constant folding runs, so the values are those
   a session would have folded.
4. Computed outputs that some remaining node reads (or that are graph outputs) become
   initializers -- external data in the cache when larger than ``SMALL_INITIALIZER_BYTES``,
   in the model's proto otherwise -- and every computed node leaves the graph. A small
   one would be folded by onnxruntime in every session anyway, but as a node it is a step
   of the plan, whose sessions keep its bookkeeping across runs (onnx's light DenseNet-121
   computes 1,078 BatchNormalization parameters so, two thirds of its nodes: 13 MiB of
   bookkeeping charged against a cap of 28 MiB). ``small=False`` keeps the small ones
   nodes, as schedules saved before this rule plan them.
5. An ``Identity`` of a constant initializer (or of such an Identity's output) is that
   initializer under another name: its output becomes an initializer that refers to the
   same bytes -- the same external data, nothing read or written -- and the node leaves,
   in models with external data of their own too (which rules 2-4 leave as they are).
   torch's exporter writes one for every weight it deduplicates (ResNet-50: 47, BERT-base:
   120, mostly biases). Left a node, its output is an activation: it crosses segment
   boundaries as one, and the segment that reads it cannot treat the weight as a constant
   -- a Conv whose bias arrives so stays out of onnxruntime's NCHWc layout (ResNet-50's
   relaid segments ran one such Conv each, in the slower plain layout).

The user's model is never modified (a copy is), and an entry is written once: a later
import of the same model finds the file and writes nothing. Models with external data of
their own are left as they are: a session reads every external file from one folder, and
the model's folder is not Hyperion's to write in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from hyperion.digest import sha256
from hyperion.errors import CacheError, OutputError
from hyperion.files import write_atomic
from hyperion.frontend.embedded import SMALL_INITIALIZER_BYTES, refer, weights_folder
from hyperion.frontend.source import ModelSource
from hyperion.ir import DEFAULT_DOMAIN, normalise_domain
from hyperion.units import MAX_TENSOR_BYTES

log = logging.getLogger(__name__)

FOLD_FORMAT = 1                      # bumped when the file's layout or the rules change: a new file name
FILL_CHUNK_BYTES = 4 << 20           # a fill is written this much at a time
EVALUATED_MAX_BYTES = 16 << 20       # an evaluated node's inputs and output each fit this
EVALUATED_TOTAL_BYTES = 64 << 20     # evaluated values held at once, until written
ALIGNMENT_BYTES = 4096               # each weight starts on a page: mapped views are aligned

_UNARY_OPS = frozenset({"Identity", "Cast", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Floor", "Ceil",
                        "Relu", "Sigmoid", "Tanh", "Sign", "Not", "Erf"})
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "And", "Or", "Equal", "Less",
                            "Greater", "Where"})
EVALUATED_OPS = _UNARY_OPS | _LAYOUT_OPS | _BROADCAST_OPS


@dataclass(frozen=True)
class ConstantValue:
    """A constant tensor known at import: one value repeated (a fill), an array, or an
    initializer decoded only when its values are needed."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fill: np.ndarray | None = None
    array: np.ndarray | None = None
    initializer: TensorProto | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def value(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        if self.fill is not None:
            return np.full(self.shape, self.fill, dtype=self.dtype)
        assert self.initializer is not None
        return numpy_helper.to_array(self.initializer)

    def write(self, handle: BinaryIO) -> None:
        """The tensor's bytes, as ONNX stores them raw (little-endian, row-major)."""
        if self.fill is None:
            handle.write(np.ascontiguousarray(self.value(), dtype=self.dtype.newbyteorder("<")).tobytes())
            return
        chunk = np.full(max(1, min(math.prod(self.shape), FILL_CHUNK_BYTES // self.dtype.itemsize)),
                        self.fill, dtype=self.dtype.newbyteorder("<")).tobytes()
        remaining = self.nbytes
        while remaining:
            written = min(remaining, len(chunk))
            handle.write(chunk[:written])
            remaining -= written


@dataclass(frozen=True)
class FoldPlan:
    """What import computes: the weights to write (in file order) and the nodes that leave."""

    weights: dict[str, ConstantValue]
    removed_nodes: frozenset[int]       # positions in graph.node
    embedded: dict[str, ConstantValue] = field(default_factory=dict)  # small: initializers in the proto

    @property
    def nbytes(self) -> int:
        return sum(value.nbytes for value in self.weights.values())


def fold_constants(source: ModelSource, small: bool = True) -> ModelSource:
    """``source`` with its tensors computed from constants as weights: the large ones
    external data in Hyperion's cache, the small ones initializers of the proto (``source``
    itself when there are none; a model with external data gets rule 5's aliases only;
    ``small=False``: the small ones stay nodes)."""
    if any(t.data_location == TensorProto.EXTERNAL for t in source.proto.graph.initializer):
        return alias_identities(source)
    plan = plan_fold(source.proto, small)
    if not plan.weights and not plan.embedded:
        return source
    folder, file, offsets = source.base_dir, "", {}
    if plan.weights:
        folder = weights_folder(source.sha256)
        file, offsets = _store(folder, plan.weights)
        log.info("%s: %d weights computed from constants (%d bytes) served from %s", source.label,
                 len(plan.weights), plan.nbytes, folder / file)
    return ModelSource(_folded_model(source.proto, plan, file, offsets), source.path, folder, source.sha256,
                       source.opset, (*plan.weights, *plan.embedded))


def plan_fold(proto: ModelProto, small: bool = True) -> FoldPlan:
    """The tensors import computes from constants and writes, and the nodes that leave (rules 1-4)."""
    graph = proto.graph
    known = _initial_constants(proto)
    computed: dict[int, str] = {}      # node position -> its output, computed here
    evaluated_bytes = 0
    for position, node in enumerate(graph.node):
        if normalise_domain(node.domain) != DEFAULT_DOMAIN or len(node.output) != 1 or not node.output[0]:
            continue
        if node.op_type == "Constant":
            constant = _constant_node_value(node)
        elif not all(name in known for name in node.input if name) or not any(node.input):
            continue
        elif node.op_type == "ConstantOfShape":
            constant = _fill(node, known[node.input[0]])
        elif node.op_type in EVALUATED_OPS and evaluated_bytes < EVALUATED_TOTAL_BYTES:
            constant = _evaluate(proto, node, [known[name] if name else None for name in node.input])
            evaluated_bytes += constant.nbytes if constant is not None else 0
        else:
            continue
        if constant is None:
            continue
        known[node.output[0]] = constant
        if node.op_type != "Constant":
            computed[position] = node.output[0]
    removed = set(computed) if small else _unread_computed_nodes(proto, computed, known)
    kept_reads = {name for position, node in enumerate(graph.node) if position not in removed for name in node.input}
    needed = kept_reads | {output.name for output in graph.output}
    folded = [computed[p] for p in sorted(removed) if computed[p] in needed]
    return FoldPlan({name: known[name] for name in folded if known[name].nbytes > SMALL_INITIALIZER_BYTES},
                    frozenset(removed),
                    {name: known[name] for name in folded if known[name].nbytes <= SMALL_INITIALIZER_BYTES})


def _constant_initializers(proto: ModelProto) -> dict[str, TensorProto]:
    """Initializers a feed cannot override (rule 1): not also graph inputs, from IR version 4 on."""
    overridable = {i.name for i in proto.graph.input} if proto.ir_version >= 4 else set()
    return {t.name: t for t in proto.graph.initializer if t.name not in overridable}


def _initial_constants(proto: ModelProto) -> dict[str, ConstantValue]:
    """Initializers a feed cannot override (rule 1), decoded lazily."""
    known = {}
    for name, tensor in _constant_initializers(proto).items():
        dtype = _numpy_dtype(tensor.data_type)
        if dtype is not None:
            known[name] = ConstantValue(dtype, tuple(tensor.dims), initializer=tensor)
    return known


def _unread_computed_nodes(proto: ModelProto, computed: Mapping[int, str],
                           known: Mapping[str, ConstantValue]) -> set[int]:
    """Computed nodes that leave the graph as schedules saved before small tensors were
    folded plan them: those whose output becomes an external weight, and those nothing
    left reads -- in reverse order, so that a chain leaves whole. A small computed tensor a
    remaining node reads keeps its node (onnxruntime folds it itself)."""
    graph = proto.graph
    readers: dict[str, int] = {output.name: 1 for output in graph.output}
    for node in graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    removed: set[int] = set()
    for position in sorted(computed, reverse=True):
        output = computed[position]
        if known[output].nbytes > SMALL_INITIALIZER_BYTES or not readers.get(output):
            removed.add(position)
            for name in set(graph.node[position].input):
                readers[name] -= 1
    return removed


def _constant_node_value(node: NodeProto) -> ConstantValue | None:
    attribute = next(iter(node.attribute), None)
    if attribute is None or len(node.attribute) != 1:
        return None
    value = helper.get_attribute_value(attribute)
    if attribute.name == "value":
        array = numpy_helper.to_array(value)
    elif attribute.name in ("value_float", "value_floats"):
        array = np.asarray(value, dtype=np.float32)
    elif attribute.name in ("value_int", "value_ints"):
        array = np.asarray(value, dtype=np.int64)
    else:  # strings, sparse values: nothing computed from them here
        return None
    if _numpy_dtype_of(array) is None or array.nbytes > EVALUATED_MAX_BYTES:
        return None
    return ConstantValue(array.dtype, array.shape, array=array)


def _fill(node: NodeProto, shape_input: ConstantValue) -> ConstantValue | None:
    """ConstantOfShape as its fill value (rule 2), or None for a shape it cannot have."""
    if shape_input.dtype != np.int64 or len(shape_input.shape) != 1 or shape_input.nbytes > SMALL_INITIALIZER_BYTES:
        return None
    dims = tuple(int(d) for d in shape_input.value())
    value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1, np.float32))
    if any(d < 0 for d in dims) or value.size != 1 or _numpy_dtype_of(value) is None:
        return None
    fill = ConstantValue(value.dtype, dims, fill=value.reshape(()))
    return fill if fill.nbytes <= MAX_TENSOR_BYTES else None


def _evaluate(proto: ModelProto, node: NodeProto, inputs: list[ConstantValue | None]) -> ConstantValue | None:
    """``node`` run by onnxruntime on its constant inputs (rule 3), when its output is
    bounded by EVALUATED_MAX_BYTES; None when it is not, or cannot be run here."""
    bound = _output_bound_bytes(node, inputs)
    if bound is None or bound > EVALUATED_MAX_BYTES or any(
            value is not None and value.nbytes > EVALUATED_MAX_BYTES for value in inputs):
        return None
    import onnxruntime as ort  # the runtime imports it anyway; only models with such nodes pay here

    feeds = {name: value.value() for name, value in zip(node.input, inputs, strict=True) if value is not None}
    graph = helper.make_graph(
        [node], "fold", [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                       array.shape) for name, array in feeds.items()],
        [helper.make_empty_tensor_value_info(node.output[0])])
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=max(proto.ir_version, 4))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # One small node a session, built and dropped by the hundred at import (DenseNet-121: 1,100):
    # no thread pool and no arena, whose blocks and per-thread heaps would stay behind.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        (array,) = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own untyped errors: the node stays a node
        log.info("node %r (%s) not computed at import: %s", node.name, node.op_type, str(exc).splitlines()[0])
        return None
    if not isinstance(array, np.ndarray) or _numpy_dtype_of(array) is None:
        return None
    return ConstantValue(array.dtype, array.shape, array=array)


def _output_bound_bytes(node: NodeProto, inputs: list[ConstantValue | None]) -> int | None:
    """At most how many bytes ``node``'s output has, from its inputs' shapes alone."""
    present = [value for value in inputs if value is not None]
    if not present:
        return None
    if node.op_type in _BROADCAST_OPS:
        try:
            elements = math.prod(np.broadcast_shapes(*(value.shape for value in present)))
        except ValueError:
            return None
    else:  # unary and layout ops keep their first input's elements
        elements = math.prod(present[0].shape)
    itemsize = max(value.dtype.itemsize for value in present)
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), 0)
        dtype = _numpy_dtype(to)
        if dtype is None:
            return None
        itemsize = dtype.itemsize
    return elements * itemsize


def _numpy_dtype(data_type: int) -> np.dtype | None:
    """The numpy type of an ONNX element type whose raw bytes numpy reads as they are."""
    if data_type not in _RAW_TYPES:
        return None
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def _numpy_dtype_of(array: np.ndarray) -> np.dtype | None:
    try:
        return _numpy_dtype(helper.np_dtype_to_tensor_dtype(array.dtype))
    except (KeyError, TypeError, ValueError):
        return None


_RAW_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64})


# -- the cache file ----------------------------------------------------------------------------
def _store(folder: Path, weights: Mapping[str, ConstantValue]) -> tuple[str, dict[str, int]]:
    """Write ``weights`` into ``folder`` once (a file already there is reused, never
    rewritten); (the file's name, each weight's offset)."""
    offsets, total = _layout(weights.values())
    name = f"folded-{_layout_digest(weights, offsets)}.bin"
    target = folder / name
    if target.exists():
        if target.is_file() and target.stat().st_size == total:
            log.info("%s: reused", target)
            return name, dict(zip(weights, offsets, strict=True))
        raise CacheError(f"{target}: a cache entry of {target.stat().st_size} bytes where Hyperion wrote "
                         f"{total}; it is not what Hyperion wrote: remove it (or set HYPERION_CACHE_DIR to "
                         "another folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise CacheError(f"{folder}: cannot create Hyperion's cache folder for the weights computed from "
                         f"constants ({exc.strerror or exc}); make it writable, or set HYPERION_CACHE_DIR to a "
                         "writable folder") from None
    if free < total:
        raise CacheError(f"{folder}: the weights computed from constants need {total} bytes, the cache folder's "
                         f"disk has {free} free; free some room, or set HYPERION_CACHE_DIR to a folder with room")

    def write(handle: BinaryIO) -> None:
        for value, offset in zip(weights.values(), offsets, strict=True):
            handle.write(b"\0" * (offset - handle.tell()))
            value.write(handle)

    try:
        write_atomic(target, write)
    except OutputError as exc:
        raise CacheError(f"{folder}: cannot write the weights computed from constants ({exc}); make the folder "
                         "writable or free some room, or set HYPERION_CACHE_DIR to another folder") from None
    log.info("%s: wrote %d weights computed from constants (%d bytes)", target, len(weights), total)
    return name, dict(zip(weights, offsets, strict=True))


def _layout(values: Iterable[ConstantValue]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for value in values:
        start = -(-end // ALIGNMENT_BYTES) * ALIGNMENT_BYTES
        offsets.append(start)
        end = start + value.nbytes
    return offsets, end


def _layout_digest(weights: Mapping[str, ConstantValue], offsets: list[int]) -> str:
    """Names the file by what it holds, so a file is only ever reused for the same content
    (the folder is the model's sha256; this covers Hyperion's rules and onnxruntime's kernels)."""
    import onnxruntime as ort

    entries = [[name, str(value.dtype), list(value.shape), offset,
                value.fill.tobytes().hex() if value.fill is not None else "evaluated"]
               for (name, value), offset in zip(weights.items(), offsets, strict=True)]
    evaluated = any(value.fill is None for value in weights.values())
    text = json.dumps({"format": FOLD_FORMAT, "onnxruntime": ort.__version__ if evaluated else None,
                       "weights": entries})
    return sha256(text.encode()).hexdigest()[:16]


# -- aliases (rule 5) ----------------------------------------------------------------------------
def alias_identities(source: ModelSource) -> ModelSource:
    """``source`` with every Identity of a constant initializer replaced by an initializer
    of the Identity's output name over the same bytes (rule 5); ``source`` itself when it
    has none."""
    proto = source.proto
    constants = _constant_initializers(proto)
    aliases: dict[int, TensorProto] = {}   # node position -> the initializer its output becomes
    for position, node in enumerate(proto.graph.node):
        if (node.op_type == "Identity" and normalise_domain(node.domain) == DEFAULT_DOMAIN
                and len(node.input) == 1 and len(node.output) == 1 and node.output[0]
                and node.input[0] in constants and node.output[0] not in constants):
            alias = TensorProto()
            alias.CopyFrom(constants[node.input[0]])   # external data: the same file, offset and length
            alias.name = node.output[0]
            constants[alias.name] = aliases[position] = alias
    if not aliases:
        return source
    log.info("%s: %d Identity nodes of weights served as the weights themselves", source.label, len(aliases))
    return dataclasses.replace(source, proto=_nodes_as_initializers(proto, set(aliases), aliases.values()))


# -- the folded model --------------------------------------------------------------------------
def _folded_model(proto: ModelProto, plan: FoldPlan, file: str, offsets: Mapping[str, int]) -> ModelProto:
    """A copy of ``proto`` whose computed nodes are gone and whose folded weights are
    external-data initializers in ``file``."""
    tensors = []
    for name, value in plan.weights.items():
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape)
        refer(tensor, file, offsets[name], value.nbytes)
        tensors.append(tensor)
    tensors.extend(numpy_helper.from_array(value.value(), name) for name, value in plan.embedded.items())
    return _nodes_as_initializers(proto, plan.removed_nodes, tensors)


def _nodes_as_initializers(proto: ModelProto, removed: Collection[int], initializers: Iterable[TensorProto]
                           ) -> ModelProto:
    """A copy of ``proto`` without the nodes at positions ``removed``, with ``initializers`` added."""
    copy = ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.node[:]
    copy.graph.node.extend(n for p, n in enumerate(proto.graph.node) if p not in removed)
    for tensor in initializers:
        copy.graph.initializer.append(tensor)
        if proto.ir_version < 4:  # initializers were graph inputs too before IR version 4
            copy.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return copy
