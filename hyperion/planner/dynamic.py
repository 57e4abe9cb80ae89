"""Plans under a cap for models whose tensor sizes only the data decides.

Two ways, tried in this order (docs/dynamic_shapes.md):

1. *Bounds.* Where every unknown size has an upper bound from the op's semantics
   (:mod:`hyperion.frontend.bounds`) and the plan with the bounded sizes fits, that is
   the plan: the runtime needs nothing new, real sizes are never larger. The schedule
   marks those tensors ``upper_bound``.
2. *Re-planning.* Otherwise the schedule plans the *prefix*: every node that no unknown
   size precedes, up to and including the steps that decide the unknown sizes (the
   *frontier*). A frontier op with a bound runs in the prefix, its output counted at
   the bound (or at 0 when the bound does not fit; the run then checks the observed
   size against the cap); one without (Range, Expand, ConstantOfShape, ... whose size
   comes from a value) waits for the suffix, and the small integer tensors (and numeric
   scalars) it reads are observed by value. One without a bound and without such an
   input (all it reads is known, yet onnx cannot size it) runs in the prefix, counted
   at 0. The schedule's ``replan`` record lists these points and the rest of the model,
   which :mod:`hyperion.replan` plans at run time per observed signature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

from hyperion.errors import MemoryLimitError
from hyperion.frontend import ImportedModel
from hyperion.frontend.bounds import Bound, unsized_tensors, upper_bounds
from hyperion.ir import Graph, TensorRole
from hyperion.schedule import Observe, Replan, ReplanPoint, Schedule

PlanSized = Callable[[ImportedModel], Schedule]
# Integer tensors of at most this many elements that decide a later size are observed by
# value (their value becomes a constant of the re-planned rest): shapes, counts, limits.
VALUE_OBSERVED_ELEMENTS = 64
VALUE_DTYPES = frozenset({"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"})
SCALAR_DTYPES = frozenset({"float32", "float64", "float16"})


def plan_dynamic(imported: ImportedModel, plan_sized: PlanSized) -> Schedule:
    """The schedule of ``imported``, some of whose sizes the data decides (see module doc)."""
    unsized = unsized_tensors(imported)
    bounds = upper_bounds(imported, unsized)
    if all(name in bounds for name in unsized):
        try:
            return _bounded_schedule(plan_sized(with_sizes(imported, bounds)), bounds)
        except MemoryLimitError:
            pass  # the real sizes may fit where the bounds do not: re-plan from observed ones
    return _prefix_schedule(imported, unsized, bounds, plan_sized)


def with_sizes(imported: ImportedModel, sizes: Mapping[str, Bound | int]) -> ImportedModel:
    """``imported`` with these tensors' bytes set (bounds, or what a prefix counts)."""
    graph = imported.graph
    tensors = dict(graph.tensors)
    for name, size in sizes.items():
        if name in tensors:
            tensors[name] = dataclasses.replace(tensors[name], nbytes=size.nbytes if isinstance(size, Bound) else size)
    return dataclasses.replace(imported, graph=graph.with_tensors(tensors))


def _bounded_schedule(schedule: Schedule, bounded: Iterable[str]) -> Schedule:
    names = set(bounded)
    tensors = {name: dataclasses.replace(record, upper_bound=True) if name in names else record
               for name, record in schedule.tensors.items()}
    return dataclasses.replace(schedule, tensors=tensors)


@dataclasses.dataclass(frozen=True)
class _Split:
    prefix_nodes: tuple[str, ...]
    suffix_nodes: tuple[str, ...]
    shape_points: tuple[str, ...]    # outputs of bounded frontier ops: run in the prefix
    value_points: tuple[str, ...]    # small integer inputs of unbounded frontier ops
    carried: tuple[str, ...]         # what the prefix hands on (the points included)
    reason: str


def _prefix_schedule(imported: ImportedModel, unsized: list[str], bounds: Mapping[str, Bound],
                     plan_sized: PlanSized) -> Schedule:
    split = split_at_frontier(imported, unsized, bounds)
    prefix = dataclasses.replace(imported, graph=cut_graph(imported.graph, split.prefix_nodes, split.carried))
    counted = {name: bounds.get(name, Bound(0)) for name in split.shape_points}
    try:
        schedule = plan_sized(with_sizes(prefix, counted))
    except MemoryLimitError:
        # The bounds do not fit: the prefix counts nothing for them, and the run checks
        # the observed sizes against the cap before going on (hyperion.replan).
        counted = {name: Bound(0) for name in split.shape_points}
        schedule = plan_sized(with_sizes(prefix, counted))
    step_of = {step.node: step.index for step in schedule.steps}
    graph = imported.graph
    points = tuple(
        [ReplanPoint(name, step_of[graph.tensors[name].producer], Observe.SHAPE,  # type: ignore[index]
                     counted[name].nbytes) for name in split.shape_points]
        + [ReplanPoint(name, _deciding_step(graph, name, step_of), Observe.VALUE, 0)
           for name in split.value_points])
    replan = Replan(points, split.suffix_nodes, graph.outputs, split.reason)
    return _bounded_schedule(dataclasses.replace(schedule, replan=replan),
                             [name for name in split.shape_points if counted[name].nbytes])


def _deciding_step(graph: Graph, tensor: str, step_of: Mapping[str, int]) -> int:
    producer = graph.tensors[tensor].producer
    return -1 if producer is None else step_of[producer]


def split_at_frontier(imported: ImportedModel, unsized: list[str], bounds: Mapping[str, Bound]) -> _Split:
    """Where the prefix ends: after the ops that first produce an unknown size."""
    graph, unknown = imported.graph, set(unsized)
    shape_points: list[str] = []
    value_points: list[str] = []
    suffix: set[str] = set()
    later: set[str] = set()   # tensors known only after a re-plan point
    reasons: list[str] = []
    for name in graph.topological_order():
        node = graph.nodes[name]
        outputs = [t for t in node.outputs if t in unknown]
        if any(t in later for t in node.inputs):
            suffix.add(name)
            later.update(node.outputs)
        elif outputs and all(t in bounds for t in outputs):  # runs in the prefix; its sizes are observed
            shape_points.extend(outputs)
            later.update(outputs)
            reasons.append(f"{node.op_type} {name!r} decides the shape of {', '.join(map(repr, outputs))}")
        elif outputs:  # waits for the value that sizes it
            # Values already known (constants, or observed by an earlier re-plan) cannot help again.
            values = [t for t in node.inputs if _observable_value(graph, t) and graph.constant(t) is None]
            if not values:  # nothing to wait for: it runs in the prefix, counted at 0, and is observed
                shape_points.extend(outputs)
                later.update(outputs)
                reasons.append(f"{node.op_type} {name!r} decides the shape of {', '.join(map(repr, outputs))} "
                               "(no bound: counted when observed)")
                continue
            suffix.add(name)
            later.update(node.outputs)
            value_points.extend(t for t in values if t not in value_points)
            reasons.append(f"{node.op_type} {name!r} is sized by the value of {', '.join(map(repr, values))}")
    prefix = tuple(name for name in graph.nodes if name not in suffix)
    suffix_nodes = tuple(name for name in graph.nodes if name in suffix)
    suffix_reads = {t for name in suffix_nodes for t in graph.nodes[name].inputs}
    produced = {t for name in prefix for t in graph.nodes[name].outputs}
    # Constants the rest reads are bound by value too: its shape inference then knows them
    # (a Squeeze's axes, a Reshape's target), and they never change the signature.
    value_points.extend(t for name in prefix for t in graph.nodes[name].outputs
                        if t in suffix_reads and graph.constant(t) is not None and t not in value_points)
    carried = tuple(dict.fromkeys(
        [*shape_points, *(t for t in value_points if t in produced),
         *(t for t in graph.outputs if t in produced),
         *(t for name in prefix for t in graph.nodes[name].outputs if t in suffix_reads)]))
    reason = ("sizes only the data decides: " + "; ".join(reasons) + f"; planned here: the {len(prefix)} steps up "
              f"to them; the other {len(suffix_nodes)} are planned at run time once per observed signature")
    return _Split(prefix, suffix_nodes, tuple(shape_points), tuple(value_points), carried, reason)


def _observable_value(graph: Graph, tensor: str) -> bool:
    """A small integer tensor, or a numeric scalar (Range's float start, limit and delta)."""
    info = graph.tensors[tensor]
    if info.role is TensorRole.WEIGHT or info.nbytes is None or info.shape is None or \
            not all(isinstance(d, int) for d in info.shape):
        return False
    elements = _elements(info.shape)
    if info.dtype in VALUE_DTYPES:
        return elements <= VALUE_OBSERVED_ELEMENTS
    return elements == 1 and info.dtype in SCALAR_DTYPES


def _elements(shape: tuple[int | str, ...]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def cut_graph(graph: Graph, nodes: Iterable[str], outputs: Iterable[str]) -> Graph:
    """``graph`` cut down to ``nodes``, with ``outputs`` its only outputs (every graph input stays)."""
    kept = [graph.nodes[name] for name in nodes]
    kept_names = {node.name for node in kept}
    wanted = tuple(dict.fromkeys(outputs))
    names = dict.fromkeys([*graph.inputs, *wanted, *(t for node in kept for t in (*node.inputs, *node.outputs))])
    tensors = {}
    for name in names:
        info = graph.tensors[name]
        role = (TensorRole.OUTPUT if name in wanted and info.role is not TensorRole.INPUT
                else TensorRole.ACTIVATION if info.role is TensorRole.OUTPUT else info.role)
        tensors[name] = dataclasses.replace(info, role=role,
                                            consumers=tuple(c for c in info.consumers if c in kept_names))
    constants = {name: value for name, value in graph.constants.items() if name in tensors}
    return Graph(kept, tensors, graph.inputs, wanted, constants=constants, opset=graph.opset)

