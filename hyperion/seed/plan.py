"""The scheduler's one core: a plan of layers read off an IR graph and its liveness.

Both ways of filling a scheduler end here. Layers added by hand become a synthetic
IR graph that runs through the compiler passes (see :mod:`hyperion.seed.hand`); an
ONNX model is compiled by the same passes into a schedule. Either way
:func:`layer_plan` turns graph edges into dependencies and liveness frees into
release points, so the two paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hyperion.errors import SchedulerError
from hyperion.frontend import ImportedModel
from hyperion.ir import Edge, EdgeKind, Graph
from hyperion.passes.liveness import activation_live_bytes, compute_liveness
from hyperion.schedule import Schedule
from hyperion.seed.types import Dependency, DependencyType


@dataclass(frozen=True)
class PlannedLayer:
    index: int                            # the layer's index: the user's, or its step for ONNX
    node: str                             # its node in the IR graph
    dependencies: tuple[Dependency, ...]  # sorted by layer index
    reads: tuple[str, ...]                # other layers' outputs and graph inputs it reads
    outputs: tuple[str, ...]
    output_bytes: int
    released_after: int | None            # layer whose step releases every output; None: kept


@dataclass(frozen=True)
class LayerPlan:
    """Layers in execution order (``layers[step]``) with the plan's bytes per step."""

    layers: tuple[PlannedLayer, ...]
    frees: tuple[tuple[str, ...], ...]     # per step: tensors marked unneeded right after it
    activation_bytes: tuple[int, ...]      # per step, per sample: live activations and inputs
    weight_bytes: tuple[int, ...]          # per step: the rest of the plan's bytes (weights)
    graph_outputs: tuple[str, ...]

    @property
    def step_bytes(self) -> tuple[int, ...]:
        return tuple(a + w for a, w in zip(self.activation_bytes, self.weight_bytes, strict=True))

    @property
    def peak_bytes(self) -> int:
        return max(self.step_bytes, default=0)

    def by_index(self) -> dict[int, PlannedLayer]:
        return {layer.index: layer for layer in self.layers}

    def batch_peak_bytes(self, batch: int, input_bytes: int, output_bytes: int) -> int:
        """The plan's peak with every per-sample byte scaled by ``batch``, plus the
        caller's input and output buffers for ``batch`` samples."""
        steps = zip(self.activation_bytes, self.weight_bytes, strict=True)
        return max((batch * a + w for a, w in steps), default=0) + batch * (input_bytes + output_bytes)

    def optimal_batch_size(self, input_bytes: int, output_bytes: int, memory_limit: int | None,
                           max_batch: int) -> int:
        return optimal_batch_size(self.activation_bytes, self.weight_bytes, input_bytes, output_bytes,
                                  memory_limit, max_batch)


def optimal_batch_size(activation_bytes: Sequence[int], weight_bytes: Sequence[int], input_bytes: int,
                       output_bytes: int, memory_limit: int | None, max_batch: int) -> int:
    """Largest b <= ``max_batch`` with max_i(b·a_i + w_i) + b·(input + output) <= limit.

    Each step bounds b by (limit - w_i) // (a_i + input + output), since weights do
    not grow with the batch; 0 when not even one sample fits. Pure arithmetic on
    the plan, no trial runs.
    """
    if memory_limit is None:
        return max_batch
    best = max_batch
    for activations, weights in list(zip(activation_bytes, weight_bytes, strict=True)) or [(0, 0)]:
        room_bytes = memory_limit - weights
        per_sample_bytes = activations + input_bytes + output_bytes
        if room_bytes < 0:
            return 0
        if per_sample_bytes:
            best = min(best, room_bytes // per_sample_bytes)
    return max(best, 0)


def layer_plan(graph: Graph, order: Sequence[str], edges: Iterable[Edge], frees: Sequence[Sequence[str]],
               step_bytes: Sequence[int], index_of: Mapping[str, int]) -> LayerPlan:
    """The plan of ``graph`` run in ``order``: one layer per node, dependencies from
    the classified ``edges``, release points from ``frees`` (liveness, per step).

    ``step_bytes`` are the plan's accounted bytes per step. The part that grows with
    the batch is the live activations (liveness); the rest — weights, however the
    segment pass accounts them — is taken as fixed.
    """
    dependencies: dict[str, dict[int, DependencyType]] = {node: {} for node in order}
    for edge in edges:
        if edge.kind is None:
            raise SchedulerError(f"edge {edge.src} -> {edge.dst} ({edge.tensor}) has no kind; "
                                 "run classify_edges first")
        kind = DependencyType.from_edge_kind(edge.kind)
        source = index_of[edge.src]
        known = dependencies[edge.dst].get(source)
        if known is None or kind.precedence > known.precedence:
            dependencies[edge.dst][source] = kind
    free_step = {tensor: step for step, names in enumerate(frees) for tensor in names}
    layers = tuple(
        PlannedLayer(
            index=index_of[node], node=node,
            dependencies=tuple(Dependency(j, t) for j, t in sorted(dependencies[node].items())),
            reads=_reads(graph, node), outputs=graph.nodes[node].outputs,
            output_bytes=sum(graph.tensors[t].nbytes or 0 for t in graph.nodes[node].outputs),
            released_after=_released_after(graph.nodes[node].outputs, free_step, order, index_of))
        for node in order)
    activations = activation_live_bytes(graph, compute_liveness(graph, tuple(order)))
    fixed = tuple(max(total - live, 0) for total, live in zip(step_bytes, activations, strict=True))
    return LayerPlan(layers, tuple(tuple(names) for names in frees), tuple(activations), fixed, graph.outputs)


def _reads(graph: Graph, node: str) -> tuple[str, ...]:
    """What the node needs held when it runs: other layers' outputs and graph inputs."""
    return tuple(t for t in dict.fromkeys(graph.nodes[node].inputs)
                 if graph.tensors[t].producer is not None or t in graph.inputs)


def _released_after(outputs: Sequence[str], free_step: Mapping[str, int], order: Sequence[str],
                    index_of: Mapping[str, int]) -> int | None:
    if not outputs or any(t not in free_step for t in outputs):
        return None  # a graph output: kept to the end of the pass
    return index_of[order[max(free_step[t] for t in outputs)]]


def onnx_layer_plan(imported: ImportedModel, schedule: Schedule) -> LayerPlan:
    """The plan of a compiled schedule: layer i is step i; edge kinds and frees are
    the schedule's own, so the scheduler runs exactly what was compiled."""
    order = tuple(step.node for step in schedule.steps)
    edges = (Edge(e.src, e.dst, e.tensor, EdgeKind(e.kind)) for e in schedule.edges)
    frees = [step.frees for step in schedule.steps]
    index_of = {node: step for step, node in enumerate(order)}
    step_bytes = [step.live_bytes for step in schedule.steps]
    return layer_plan(imported.graph, order, edges, frees, step_bytes, index_of)


__all__ = ["LayerPlan", "PlannedLayer", "layer_plan", "onnx_layer_plan", "optimal_batch_size"]
