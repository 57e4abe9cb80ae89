"""Cut a model's compiled order into pipeline stages, each a model of its own under its own cap.

``partition(model, stages=N, memory_limit_per_stage=cap)`` plans the whole model once
(normal mode, no cap: the compiled topological order), estimates every step's time and the
bytes each stage would hold, and cuts the order into N contiguous stages:

1. Feasible stages hold their weights resident under the cap: the weights as a live
   onnxruntime session holds them (packed, ``passes/memory/costs.py``) plus the most
   activation bytes live at any of their steps. When no cut into N resident stages exists,
   stages run in ``memory_opt`` where their share cannot fit (or, with
   ``require_resident=True``, :class:`~hyperion.errors.PartitionError` names the fewest
   stages and the smallest cap that would fit).
2. Balance: the slowest stage (``balance="time"``: estimated seconds per step;
   ``"bytes"``: weight bytes, DeepSpeed's ``partition_method="parameters"``) is made as
   fast as possible (binary search over a greedy cut, exact for contiguous cuts), then
3. among the cuts whose slowest stage is within 5% of that best, the one whose boundaries
   carry the fewest activation bytes (a dynamic programme); :mod:`~hyperion.planner.partition_cut`.

Each stage is then a sub-model of the user's model (its nodes, the tensors it receives as
inputs, the tensors later stages or the caller need as outputs; weights as the user's
initializers, external data referenced, never copied) compiled by Hyperion under the cap
(``adaptive``: normal when its share fits). ``Partition.save`` / ``Partition.load``
(:mod:`hyperion.planner.partition_file`) write and read it. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import ModelProto

from hyperion.errors import MemoryLimitError, OptionError, PartitionError
from hyperion.frontend import ImportedModel, ModelLike, declared_input_shapes, import_model, load_source
from hyperion.frontend.build import unique_node_names
from hyperion.ir import SMALL_TENSOR_BYTES, ExecutionMode, Graph
from hyperion.planner.emit import FREE_BATCH_DIM
from hyperion.planner.partition_cut import Balance, plan_cut, step_facts
from hyperion.planner.plan import plan
from hyperion.schedule import ModelRef, Schedule
from hyperion.units import format_size, parse_size

if TYPE_CHECKING:
    from hyperion.frontend import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageEdge:
    """A tensor flowing between stages: ``src`` None is the caller's feed, ``dst`` None the caller."""

    src: int | None
    dst: int | None
    tensor: str
    bytes: int


@dataclass(frozen=True)
class Stage:
    index: int
    first_step: int                       # in the whole model's compiled order
    last_step: int
    nodes: tuple[str, ...]                # in compiled order; its model's nodes
    inputs: tuple[str, ...]               # what it receives: graph inputs and earlier stages' outputs
    outputs: tuple[str, ...]              # what later stages or the caller need from it
    copied_constants: tuple[str, ...]     # small Constant outputs of earlier stages it recomputes
    weights: tuple[str, ...]
    weight_bytes: int                     # as a live session holds them (packed)
    activation_bytes: int                 # the most activation bytes live at one of its steps (estimated)
    estimated_ms: float
    model: bytes = dataclasses.field(repr=False)   # its ONNX model (weights referenced in the user's files)
    schedule: Schedule = dataclasses.field(repr=False)  # its model compiled under the cap

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def resident(self) -> bool:
        return self.schedule.mode is ExecutionMode.NORMAL


@dataclass(frozen=True)
class Partition:
    model: ModelRef
    base_dir: str                         # the user's model folder: where stage models' weights resolve
    memory_limit_per_stage: int | None
    balance: str
    input_shapes: Mapping[str, tuple[int, ...]]
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]
    free_batch: bool                      # stage models declare axis 0 of every boundary tensor free
    stages: tuple[Stage, ...]
    edges: tuple[StageEdge, ...]

    @property
    def boundary_bytes(self) -> int:
        """Activation bytes sent from one stage to another per run."""
        return sum(e.bytes for e in self.edges if e.src is not None and e.dst is not None)

    def save(self, path: str | os.PathLike) -> Path:
        """The partition file at ``path``, each stage's model and schedule next to it."""
        from hyperion.planner.partition_file import save_partition  # the file format builds on this module

        return save_partition(self, path)

    @staticmethod
    def load(path: str | os.PathLike) -> Partition:
        from hyperion.planner.partition_file import load_partition

        return load_partition(path)


# -- the stages -------------------------------------------------------------------------
def _is_copied_constant(graph: Graph, tensor: str) -> bool:
    """A small Constant's output: the stage that reads it recomputes it (shape inference needs
    its value), rather than receiving it."""
    info = graph.tensors[tensor]
    node = graph.nodes.get(info.producer) if info.producer is not None else None
    return (node is not None and node.op_type == "Constant" and node.is_default_domain
            and info.nbytes is not None and info.nbytes <= SMALL_TENSOR_BYTES)


def _stage_tensors(graph: Graph, nodes: Sequence[str], later: set[str]) -> tuple[tuple[str, ...], ...]:
    produced = {t for n in nodes for t in graph.nodes[n].outputs}
    read = list(dict.fromkeys(t for n in nodes for t in graph.nodes[n].inputs))
    received = [t for t in read if t not in produced and not graph.is_weight(t)]
    copied = tuple(t for t in received if _is_copied_constant(graph, t))
    inputs = tuple(t for t in received if t not in copied)
    outputs = tuple(t for n in nodes for t in graph.nodes[n].outputs if t in graph.outputs or t in later)
    weights = tuple(sorted(t for t in read if graph.is_weight(t)))
    return inputs, outputs, copied, weights


def _batch_is_free(source: ModelSource) -> bool:
    """The user's model declares axis 0 of every input symbolic: stages then run any batch."""
    shapes = list(declared_input_shapes(source).values())
    return bool(shapes) and all(shape and isinstance(shape[0], str) for shape in shapes)


def _value_info(imported: ImportedModel, name: str, free_batch: bool) -> onnx.ValueInfoProto:
    """``name`` typed as the import inferred it; axis 0 left free when the batch is."""
    info = onnx.ValueInfoProto(name=name)
    known = imported.value_types.get(name)
    if known is not None and known.WhichOneof("value") is not None:
        info.type.CopyFrom(known)
    else:
        tensor = imported.graph.tensors[name]
        info = onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(
            np.dtype(tensor.dtype)), list(tensor.shape) if tensor.shape is not None else None)
    if free_batch and info.type.HasField("tensor_type") and len(info.type.tensor_type.shape.dim) > 0:
        info.type.tensor_type.shape.dim[0].Clear()
        info.type.tensor_type.shape.dim[0].dim_param = FREE_BATCH_DIM
    return info


def stage_model(imported: ImportedModel, index: int, nodes: Sequence[str], inputs: Sequence[str],
                outputs: Sequence[str], copied: Sequence[str], weights: Sequence[str], free_batch: bool) -> ModelProto:
    """The stage as an ONNX model: the user's nodes and initializers (external data stays
    referenced, relative to the user's model folder), boundary tensors as inputs and outputs."""
    proto = imported.source.proto
    by_name = dict(zip(unique_node_names(proto.graph.node), proto.graph.node, strict=True))
    graph = onnx.GraphProto(name=f"stage_{index}")
    graph.node.extend(by_name[imported.graph.tensors[t].producer] for t in copied)  # type: ignore[index]
    graph.node.extend(by_name[n] for n in nodes)
    graph.input.extend(_value_info(imported, t, free_batch) for t in inputs)
    graph.output.extend(_value_info(imported, t, free_batch) for t in outputs)
    wanted = set(weights)
    graph.initializer.extend(t for t in proto.graph.initializer if t.name in wanted)
    model = ModelProto(ir_version=max(proto.ir_version, 4), graph=graph)  # initializers need not be inputs
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    return model


def compile_stage(model: bytes, base_dir: str, input_shapes: Mapping[str, Sequence[int]],
                  cap: int | None) -> Schedule:
    """The stage's model planned under its cap (adaptive: resident when it fits). Its
    onnxruntime workers do not spin: stages share the host's cores with other stages."""
    imported = import_model(load_source(model, base_dir), input_shapes, isolate_symbolic=cap is not None)
    schedule = plan(imported, ExecutionMode.ADAPTIVE, cap)
    return dataclasses.replace(schedule, intra_op_spinning=False)


# -- the entry point ----------------------------------------------------------------------
def _whole_model(model: ModelLike | Schedule, input_shapes: Mapping[str, Sequence[int]] | None,
                 base_dir: str | None) -> tuple[ImportedModel, tuple[str, ...]]:
    """The model imported with bound shapes, and its compiled order (planned uncapped, normal)."""
    if isinstance(model, Schedule):
        if model.model.path is None:
            raise OptionError("model: this schedule is of an in-memory model; pass the model itself")
        schedule = model
        shapes = input_shapes or {k: [int(d) for d in v] for k, v in schedule.input_shapes.items()}
        imported = import_model(load_source(schedule.model.path), shapes)
        return imported, tuple(step.node for step in schedule.steps)
    imported = import_model(load_source(model, base_dir), input_shapes)
    schedule = plan(imported, ExecutionMode.NORMAL, None)
    return imported, tuple(step.node for step in schedule.steps)


def partition(model: ModelLike | Schedule, stages: int, memory_limit_per_stage: int | str | None = None, *,
              balance: Balance = "time", input_shapes: Mapping[str, Sequence[int]] | None = None,
              require_resident: bool = False, base_dir: str | None = None) -> Partition:
    """Cut ``model`` into ``stages`` pipeline stages, each compiled under ``memory_limit_per_stage``.

    ``model``: a path, bytes or ``ModelProto`` (as :func:`hyperion.compile` takes), a
    :class:`~hyperion.CompiledModel` or a saved :class:`~hyperion.Schedule` (its order is
    cut). ``input_shapes`` binds symbolic dims: one micro-batch's shapes for a pipeline.
    ``balance``: ``"time"`` (estimated from FLOPs and bytes touched) or ``"bytes"`` (weight
    bytes). ``require_resident``: refuse (:class:`~hyperion.errors.PartitionError`, naming
    the fewest stages and the smallest cap that fit) rather than run a stage memory_opt."""
    if balance not in ("time", "bytes"):
        raise OptionError(f"balance: expected 'time' or 'bytes', got {balance!r}")
    cap = parse_size(memory_limit_per_stage, option="memory_limit_per_stage")
    schedule = getattr(model, "schedule", None)   # a CompiledModel: cut its plan's order
    imported, order = _whole_model(schedule if isinstance(schedule, Schedule) else model,  # type: ignore[arg-type]
                                   input_shapes, base_dir)
    graph = imported.graph
    facts = step_facts(graph, order, balance)
    starts = plan_cut(facts, stages, cap, require_resident=require_resident)
    free_batch = _batch_is_free(imported.source)
    spans = list(zip(starts, [*starts[1:], len(order)], strict=True))
    stage_of = {name: k for k, (a, b) in enumerate(spans) for name in order[a:b]}
    built: list[Stage] = []
    for k, (start, stop) in enumerate(spans):
        nodes = order[start:stop]
        later = {t for n in order[stop:] for t in graph.nodes[n].inputs}
        inputs, outputs, copied, weights = _stage_tensors(graph, nodes, later)
        proto = stage_model(imported, k, nodes, inputs, outputs, copied, weights, free_batch)
        data = proto.SerializeToString()
        shapes = {t: [int(d) for d in graph.tensors[t].shape or ()] for t in inputs}
        try:
            schedule = compile_stage(data, str(imported.source.base_dir), shapes, cap)
        except MemoryLimitError as error:   # even streaming its weights, one of its steps needs more
            raise PartitionError(f"stage {k} (steps {start}-{stop - 1} of {imported.source.label}): {error}",
                                 smallest_limit_bytes=error.smallest_limit_bytes) from None
        built.append(Stage(
            index=k, first_step=start, last_step=stop - 1, nodes=nodes, inputs=inputs, outputs=outputs,
            copied_constants=copied, weights=weights, weight_bytes=sum(facts.weight_bytes[start:stop]),
            activation_bytes=max(facts.live_bytes[start:stop]),
            estimated_ms=sum(facts.seconds[start:stop]) * 1e3 if balance == "time" else 0.0,
            model=data, schedule=schedule))
        log.info("stage %d: steps %d-%d, %s of weights, %s", k, start, stop - 1,
                 format_size(built[-1].weight_bytes), schedule.mode.value)
    source = imported.source
    return Partition(
        model=ModelRef(str(source.path) if source.path else None, source.sha256, source.opset),
        base_dir=str(source.base_dir), memory_limit_per_stage=cap, balance=balance,
        input_shapes={k: tuple(int(d) for d in v) for k, v in imported.input_shapes.items()},
        graph_inputs=graph.inputs, graph_outputs=graph.outputs, free_batch=free_batch, stages=tuple(built),
        edges=_stage_edges(graph, built, stage_of))


def _stage_edges(graph: Graph, stages: Sequence[Stage], stage_of: Mapping[str, int]) -> tuple[StageEdge, ...]:
    edges = []
    for stage in stages:
        for tensor in stage.inputs:
            producer = graph.tensors[tensor].producer
            edges.append(StageEdge(stage_of.get(producer) if producer else None, stage.index, tensor,
                                   graph.tensors[tensor].nbytes or 0))
    edges.extend(StageEdge(stage_of.get(graph.tensors[t].producer or ""), None, t, graph.tensors[t].nbytes or 0)
                 for t in graph.outputs)
    return tuple(edges)
