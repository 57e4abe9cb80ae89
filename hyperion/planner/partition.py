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
3. among the cuts whose slowest stage is within ``BALANCE_SLACK`` of that best, the one
   whose boundaries carry the fewest activation bytes (a dynamic programme).

Each stage is then a sub-model of the user's model (its nodes, the tensors it receives as
inputs, the tensors later stages or the caller need as outputs; weights as the user's
initializers, external data referenced, never copied) compiled by Hyperion under the cap
(``adaptive``: normal when its share fits). ``Partition.save`` / ``Partition.load``
(:mod:`hyperion.planner.partition_file`) write and read it. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx
from onnx import ModelProto

from hyperion.errors import OptionError, PartitionError
from hyperion.frontend import ImportedModel, ModelLike, declared_input_shapes, import_model, load_source
from hyperion.frontend.build import unique_node_names
from hyperion.ir import SMALL_TENSOR_BYTES, ExecutionMode, Graph
from hyperion.passes.memory.costs import packed_bytes, resident_bytes
from hyperion.planner.emit import FREE_BATCH_DIM
from hyperion.planner.plan import plan
from hyperion.schedule import ModelRef, Schedule
from hyperion.units import format_size, parse_size

if TYPE_CHECKING:
    from hyperion.frontend import ModelSource

log = logging.getLogger(__name__)

Balance = Literal["time", "bytes"]
# A rough CPU (2 cores with AVX2, float32): what turns FLOPs and bytes touched into an
# estimated time. Only the ratio between steps matters for balancing.
ESTIMATED_FLOPS_PER_S = 50e9
ESTIMATED_BYTES_PER_S = 10e9
# Cuts whose slowest stage is within this fraction of the best are equally balanced;
# among them the one with the fewest boundary bytes wins.
BALANCE_SLACK = 0.05


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


# -- per-step facts ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Steps:
    order: tuple[str, ...]
    seconds: list[float]        # estimated time of each step
    weight_bytes: list[int]     # held bytes of the weights first read at each step
    live_bytes: list[int]       # activation bytes live during each step (whole model), plus the
                                # largest weight onnxruntime packs: its original is held while packing
    cut_bytes: list[int]        # activation bytes crossing a cut before step i (index len(order): 0)


def _numel(shape: tuple[int | str, ...] | None) -> int:
    return math.prod(int(d) for d in shape) if shape is not None and all(isinstance(d, int) for d in shape) else 0


def step_flops(graph: Graph, node_name: str) -> int:
    """Multiply-adds x 2 of the ops that dominate time; 0 for the others (bytes cover them)."""
    node = graph.nodes[node_name]
    if not node.outputs:
        return 0
    out = _numel(graph.tensors[node.outputs[0]].shape)
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "FusedMatMul"):
        a = graph.tensors[node.inputs[0]].shape
        if a and isinstance(a[-1], int):
            k = a[-1] if node.op_type != "Gemm" or not node.int_attribute("transA", 0) else a[0]
            return 2 * out * int(k)
    if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = graph.tensors[node.inputs[1]].shape
        if w:
            per_output = _numel(w[1:]) if node.op_type == "Conv" else _numel(w) // max(1, int(w[0]))
            return 2 * out * per_output
    return 0


def _step_facts(graph: Graph, order: Sequence[str], balance: Balance) -> _Steps:
    position = {name: i for i, name in enumerate(order)}
    seconds, weights, seen = [], [], set()
    for name in order:
        node = graph.nodes[name]
        touched = sum(graph.tensors[t].nbytes or 0 for t in (*node.inputs, *node.outputs))
        seconds.append(step_flops(graph, name) / ESTIMATED_FLOPS_PER_S + touched / ESTIMATED_BYTES_PER_S)
        new = [w for w in node.inputs if graph.is_weight(w) and w not in seen]
        seen.update(new)
        weights.append(sum(resident_bytes(graph, w) for w in new))
    if balance == "bytes":
        seconds = [float(b) for b in weights]
    steps = len(order)
    live = [0] * (steps + 1)
    cut = [0] * (steps + 2)
    for tensor in graph.tensors.values():
        if graph.is_weight(tensor.name) or not tensor.nbytes:
            continue
        first = position[tensor.producer] if tensor.producer in position else 0
        uses = [position[c] for c in tensor.consumers if c in position]
        last = steps - 1 if tensor.name in graph.outputs else max(uses, default=first)
        live[first] += tensor.nbytes
        live[last + 1] -= tensor.nbytes
        if tensor.producer in position and uses and max(uses) > first:
            cut[first + 1] += tensor.nbytes        # crosses every cut after its producer ...
            cut[max(uses) + 1] -= tensor.nbytes    # ... up to (and including) the one before its last use
    packing = max((graph.tensors[w].nbytes or 0 for w in seen if packed_bytes(graph, w) is not None), default=0)
    live_bytes = [b + packing for b in _running(live)[:steps]]
    return _Steps(tuple(order), seconds, weights, live_bytes, _running(cut)[:steps + 1])


def _running(deltas: list[int]) -> list[int]:
    total, out = 0, []
    for d in deltas:
        total += d
        out.append(total)
    return out


# -- the cut ----------------------------------------------------------------------------
class _Ranges:
    """Cost and memory need of any contiguous range of steps, from prefix sums."""

    def __init__(self, facts: _Steps) -> None:
        self.facts = facts
        self.time = [0.0, *_running_float(facts.seconds)]
        self.weights = [0, *_running(facts.weight_bytes)]

    def cost(self, start: int, stop: int) -> float:
        return self.time[stop] - self.time[start]

    def lowest_starts(self, bound: float, cap: int | None) -> list[int]:
        """For every stop, the lowest start whose range [start, stop) costs at most ``bound``
        and needs at most ``cap`` (two pointers; a deque keeps the window's live maximum)."""
        live, lows, window, start = self.facts.live_bytes, [0], deque[int](), 0
        for stop in range(1, len(live) + 1):
            while window and live[window[-1]] <= live[stop - 1]:
                window.pop()
            window.append(stop - 1)
            while start < stop - 1 and not self._fits(start, stop, bound, cap, live[window[0]]):
                start += 1
                while window[0] < start:
                    window.popleft()
            lows.append(start)
        return lows

    def _fits(self, start: int, stop: int, bound: float, cap: int | None, live_max: int) -> bool:
        need = self.weights[stop] - self.weights[start] + live_max
        return self.cost(start, stop) <= bound and (cap is None or need <= cap)

    def need(self, start: int, stop: int) -> int:
        return self.weights[stop] - self.weights[start] + max(self.facts.live_bytes[start:stop])


def _running_float(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


def _fewest_stages(ranges: _Ranges, bound: float, cap: int | None) -> int | None:
    """Greedy: each stage as long as the bounds allow; None if one step alone breaks them."""
    lows, count, stop = ranges.lowest_starts(bound, cap), 0, len(ranges.facts.order)
    while stop > 0:
        start = lows[stop]
        if not ranges._fits(start, stop, bound, cap, max(ranges.facts.live_bytes[start:stop])):
            return None
        count, stop = count + 1, start
    return count


def _best_bound(ranges: _Ranges, stages: int, cap: int | None) -> float | None:
    """The smallest slowest-stage cost of a cut into at most ``stages`` stages under ``cap``."""
    high = ranges.time[-1] * (1 + 1e-9) + 1e-12
    count = _fewest_stages(ranges, high, cap)
    if count is None or count > stages:
        return None
    low = max(ranges.facts.seconds, default=0.0)
    for _ in range(60):
        middle = (low + high) / 2
        count = _fewest_stages(ranges, middle, cap)
        if count is not None and count <= stages:
            high = middle
        else:
            low = middle
    return high


def _fewest_boundary_bytes(ranges: _Ranges, stages: int, bound: float, cap: int | None) -> list[int]:
    """Cut positions (stage starts) of the cut into exactly ``stages`` stages whose ranges stay
    within the bounds and whose cuts carry the fewest bytes: dynamic programming over stops,
    the best earlier cut found by a sliding-window minimum (both window ends only grow)."""
    steps = len(ranges.facts.order)
    lows = ranges.lowest_starts(bound, cap)
    infinite = float("inf")
    best = [0.0] + [infinite] * steps       # best[j]: stages so far ending at stop j
    back: list[list[int]] = []
    for _ in range(stages):
        current, choice, window, next_start = [infinite] * (steps + 1), [0] * (steps + 1), deque[int](), 0
        for stop in range(1, steps + 1):
            while next_start < stop:   # candidate previous stops: next_start < stop
                while window and best[window[-1]] >= best[next_start]:
                    window.pop()
                window.append(next_start)
                next_start += 1
            while window and window[0] < lows[stop]:
                window.popleft()
            if window and best[window[0]] < infinite:
                cut = ranges.facts.cut_bytes[stop] if stop < steps else 0
                current[stop], choice[stop] = best[window[0]] + cut, window[0]
        best = current
        back.append(choice)
    if best[steps] == infinite:
        return []
    starts, stop = [], steps
    for k in range(stages - 1, -1, -1):
        stop = back[k][stop]
        starts.append(stop)
    return starts[::-1]


def plan_cut(facts: _Steps, stages: int, cap: int | None, *, require_resident: bool) -> list[int]:
    """The first step of every stage."""
    steps = len(facts.order)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= steps:
        raise OptionError(f"stages: expected an integer from 1 to the model's {steps} steps, got {stages!r}")
    ranges = _Ranges(facts)
    bound = _best_bound(ranges, stages, cap)
    if bound is None and cap is not None:
        if require_resident:
            raise _no_resident_cut(ranges, stages, cap)
        log.info("no cut into %d stages holds every stage's weights under %s: stages run memory_opt where "
                 "they must", stages, format_size(cap))
        cap = None
        bound = _best_bound(ranges, stages, None)
    assert bound is not None
    starts = _fewest_boundary_bytes(ranges, stages, bound * (1 + BALANCE_SLACK) + 1e-12, cap)
    assert len(starts) == stages, "a cut within the best bound always exists"
    return starts


def _no_resident_cut(ranges: _Ranges, stages: int, cap: int) -> PartitionError:
    steps = len(ranges.facts.order)
    fewest = _fewest_stages(ranges, math.inf, cap) or 0
    # The smallest cap for `stages` stages: the cut whose neediest stage needs least -- the
    # same greedy search with need in place of time.
    low, high = max(ranges.need(i, i + 1) for i in range(steps)), ranges.need(0, steps)
    while low < high:
        middle = (low + high) // 2
        count = _fewest_stages(ranges, math.inf, middle)
        low, high = (low, middle) if count is not None and count <= stages else (middle + 1, high)
    fewer = (f"{fewest} stages fit it" if fewest else
             f"no number of stages fits it (one step alone needs more); raise it to {format_size(low)}")
    return PartitionError(
        f"memory_limit_per_stage {format_size(cap)}: no cut into {stages} stages holds every stage's weights "
        f"resident under it; {fewer}; {stages} stages fit under {format_size(low)} ({low} bytes)",
        smallest_stages=fewest, smallest_limit_bytes=low)


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
    facts = _step_facts(graph, order, balance)
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
        schedule = compile_stage(data, str(imported.source.base_dir), shapes, cap)
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
