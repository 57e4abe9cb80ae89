"""Layers added by hand, as the seed's examples add them, planned by the compiler passes.

Every ``add_layer`` call is recorded in a :class:`LayerTable`. Planning turns the
table into a Hyperion IR graph — one node per layer, one activation tensor of the
layer's ``output_size`` bytes — sets each edge's kind to the user's dependency
type, and runs the same ``order``, ``liveness``, ``plan_memory`` and ``segment``
passes as an ONNX model, so the release points come from the same liveness code.
``classify_edges`` is left out: the user's dependency types are the classification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hyperion.errors import MemoryLimitError, SchedulerError, SchedulerMemoryError
from hyperion.ir import ExecutionMode, Graph, NodeInfo, TensorInfo, TensorRole
from hyperion.passes import Program
from hyperion.passes.pipeline import SegmentOptions, Stage, build_pipeline
from hyperion.seed.plan import LayerPlan, layer_plan
from hyperion.seed.types import DependencyType
from hyperion.units import format_size

NO_LAYER = -1


def node_name(layer: int) -> str:
    return f"layer{layer}"


def output_name(layer: int) -> str:
    return f"layer{layer}.output"


@dataclass
class HandLayer:
    output_bytes: int
    dependencies: dict[int, DependencyType] = field(default_factory=dict)  # in the order added


class LayerTable:
    """The ``add_layer`` calls so far. Checks each call on its own; what needs every
    layer (unknown layers, cycles, memory) is checked when planning."""

    def __init__(self) -> None:
        self.layers: dict[int, HandLayer] = {}

    def add(self, index: int, depends_on: int, dep_type: object, output_size: int) -> DependencyType:
        _require_count(index, "layer index", minimum=0)
        try:
            kind = DependencyType.parse(dep_type)
        except SchedulerError as exc:
            raise SchedulerError(f"layer {index}: {exc}") from None
        _require_count(depends_on, f"layer {index}: depends_on", minimum=NO_LAYER)
        _require_count(output_size, f"layer {index}: output_size", minimum=0)
        if (depends_on == NO_LAYER) != (kind is DependencyType.NONE):
            raise SchedulerError(
                f"layer {index}: depends_on={depends_on} with {kind}: DependencyType.NONE goes with "
                "depends_on=-1 (no dependency) and every other type with the index of an added layer")
        layer = self.layers.setdefault(index, HandLayer(output_size))
        if layer.output_bytes != output_size:
            raise SchedulerError(
                f"layer {index} was added with output_size {layer.output_bytes} bytes and now "
                f"{output_size}; a layer has one output, so pass the same size for each dependency")
        if depends_on != NO_LAYER:
            known = layer.dependencies.setdefault(depends_on, kind)
            if known is not kind:
                raise SchedulerError(f"layer {index} already depends on layer {depends_on} as {known}; "
                                     f"it cannot also depend on it as {kind}")
        return kind


def _require_count(value: object, what: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SchedulerError(f"{what}: expected an integer >= {minimum}, got {value!r}")


# -- planning ----------------------------------------------------------------------------
def layer_graph(table: LayerTable) -> Graph:
    """The IR graph of the table: layer i is node ``layer<i>`` writing ``layer<i>.output``."""
    _check_known(table)
    indices = sorted(table.layers)
    consumers: dict[int, list[str]] = {i: [] for i in indices}
    for i in indices:
        for j in table.layers[i].dependencies:
            consumers[j].append(node_name(i))
    nodes = [NodeInfo(node_name(i), "Layer", "", tuple(output_name(j) for j in table.layers[i].dependencies),
                      (output_name(i),), position) for position, i in enumerate(indices)]
    # A layer nobody depends on is a result of the pass: kept to the end, as the seed keeps
    # every output until it is marked unneeded.
    outputs = tuple(output_name(i) for i in indices if not consumers[i])
    tensors = {output_name(i): TensorInfo(
        output_name(i), "uint8", (table.layers[i].output_bytes,), table.layers[i].output_bytes,
        TensorRole.OUTPUT if output_name(i) in outputs else TensorRole.ACTIVATION, node_name(i),
        tuple(consumers[i])) for i in indices}
    graph = Graph(nodes, tensors, (), outputs)
    for i in indices:
        for j, kind in table.layers[i].dependencies.items():
            graph.set_edge_kind(node_name(j), node_name(i), output_name(j), kind.to_edge_kind())
    _check_acyclic(graph)
    return graph


def _check_known(table: LayerTable) -> None:
    for i, layer in sorted(table.layers.items()):
        for j in layer.dependencies:
            if j not in table.layers:
                raise SchedulerError(f"layer {i} depends on layer {j}, which was never added; "
                                     f"add it with add_layer({j}, ...) before prepare()")


def _check_acyclic(graph: Graph) -> None:
    cycle = graph.find_cycle()
    if cycle is None:
        return
    path = [*cycle, cycle[0]]
    raise SchedulerError("the layers form a dependency cycle: "
                         + " -> ".join(name.removeprefix("layer") for name in path)
                         + "; a layer can only depend on layers that run before it")


def plan_hand_layers(table: LayerTable, mode: ExecutionMode, max_memory: int | None) -> LayerPlan:
    """Run the compiler passes on the table's graph, one layer per step."""
    if not table.layers:
        raise SchedulerError("no layers to schedule: add them with add_layer(...) before prepare()")
    graph = layer_graph(table)
    program = Program(graph, mode=mode, memory_limit=max_memory)
    # The user's dependency types are the classification: every stage but CLASSIFY.
    # Batch sizes scale the plan's activations: a kept heap (segment rule 14) would count as
    # fixed bytes, and hand layers run in Python, not on a runtime that keeps one.
    pipeline = build_pipeline(mode, SegmentOptions(max_segment_steps=1, keep_heap=False),
                              stages=(Stage.ORDER, Stage.PLAN))
    index_of = {node_name(i): i for i in table.layers}
    try:
        pipeline(program)
    except MemoryLimitError as exc:
        raise _over_memory(graph, program, exc, index_of, max_memory or 0) from None
    liveness, segmentation = program.liveness, program.segmentation
    assert liveness is not None and segmentation is not None  # the pipeline's postconditions
    step_bytes = segmentation.step_bytes
    return layer_plan(graph, liveness.order, graph.edges(), liveness.frees, step_bytes, index_of)


def _over_memory(graph: Graph, program: Program, exc: MemoryLimitError, index_of: dict[str, int],
                 limit_bytes: int) -> SchedulerMemoryError:
    """The segment pass's error in the seed's terms: which layer, how many bytes, and
    which earlier outputs are held while it runs."""
    layer = index_of[exc.node or ""]
    liveness = program.liveness
    assert liveness is not None  # the segment pass, which raised, reads it
    step = liveness.order.index(node_name(layer))
    held = sorted(index_of[graph.tensors[name].producer or ""]
                  for name, interval in liveness.intervals.items()
                  if step in interval and name != output_name(layer))
    own_bytes = graph.tensors[output_name(layer)].nbytes or 0
    return SchedulerMemoryError(
        f"layer {layer} needs {exc.needed_bytes} bytes ({format_size(exc.needed_bytes)}) while it runs — "
        f"its own output of {own_bytes} bytes plus the outputs of layers {held} held at that point — "
        f"but max_memory is {limit_bytes} bytes ({format_size(limit_bytes)}); raise max_memory to at "
        f"least {exc.needed_bytes} bytes", node=node_name(layer), needed_bytes=exc.needed_bytes,
        smallest_limit_bytes=exc.smallest_limit_bytes)


__all__ = ["HandLayer", "LayerTable", "layer_graph", "node_name", "output_name", "plan_hand_layers"]
