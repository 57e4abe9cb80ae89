"""Hyperion's IR: an ONNX graph as a dependency graph plus a tensor table.

One graph node per ONNX node, one edge per (producer, consumer, tensor). Graph
inputs and weights have no producer node, so no edge: a node reached only from
them depends on nothing (the seed's ``HYPERION_DEP_NONE``). Code outside this
module reads the graph through :class:`Graph` -- successors, predecessors, topological
orders, cycles, node attributes, small constant values -- never networkx itself; the
networkx view (``Graph.nx``) is what ``CompiledModel.graph`` hands users.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hyperion.errors import PassError

if TYPE_CHECKING:  # networkx is imported only when a user asks for the view
    from networkx import MultiDiGraph as NetworkxGraph

# Tensors up to this size are "small": shape-like constants whose values the IR
# carries, that shape inference keeps in its skeleton, and that segment models
# recompute instead of taking as inputs. Larger ones are data, never read at import.
SMALL_TENSOR_BYTES = 4096


class TensorRole(str, enum.Enum):
    INPUT = "input"
    WEIGHT = "weight"
    ACTIVATION = "activation"
    OUTPUT = "output"


class EdgeKind(str, enum.Enum):
    """Why a node depends on another; values match the seed's dependency types."""

    NONE = "none"
    SEQUENTIAL = "sequential"
    RESIDUAL = "residual"
    ATTENTION = "attention"


class ExecutionMode(enum.StrEnum):
    """The seed's ``HyperionExecutionMode``; prints as its value ("memory_opt")."""

    NORMAL = "normal"
    MEMORY_OPT = "memory_opt"
    STREAMING = "streaming"
    ADAPTIVE = "adaptive"

    @property
    def planning_mode(self) -> ExecutionMode:
        """What orders and memory are planned for: ``normal`` keeps every weight resident;
        every other mode loads each segment's weights when it runs, as ``memory_opt``."""
        return ExecutionMode.NORMAL if self is ExecutionMode.NORMAL else ExecutionMode.MEMORY_OPT


@dataclass(frozen=True)
class ExternalLocation:
    """Where a weight's bytes live in an ONNX external-data file."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                          # numpy dtype name; "sequence", "optional", ... otherwise
    shape: tuple[int | str, ...] | None  # str entries are symbolic dims; None: rank unknown
    nbytes: int | None                  # None until every dim is concrete
    role: TensorRole
    producer: str | None
    consumers: tuple[str, ...]
    external: ExternalLocation | None = None

    @property
    def is_sized(self) -> bool:
        return self.nbytes is not None


AttributeValue = int | float | str | list[int] | list[float] | list[str] | np.ndarray
"""A node attribute as plain Python: tensors as (small) numpy arrays; subgraphs are not kept."""


DEFAULT_DOMAIN = ""
"""The default ONNX operator set's domain, as the IR spells it (files may write ``ai.onnx``)."""


def normalise_domain(domain: str) -> str:
    """``""`` for the default ONNX domain however the file spells it, else ``domain``."""
    return DEFAULT_DOMAIN if domain == "ai.onnx" else domain


@dataclass(frozen=True)
class NodeInfo:
    name: str                 # unique within the graph
    op_type: str
    domain: str               # normalised: "" for the default ONNX domain (see normalise_domain)
    inputs: tuple[str, ...]   # non-empty inputs, then outer-scope tensors its subgraphs read
    outputs: tuple[str, ...]  # non-empty outputs
    index: int                # position in the ONNX file's node list
    # Inputs and outputs by position, as the op's schema numbers them ("" for an omitted
    # optional one; an unread optional output the IR dropped keeps its slot); default to
    # ``inputs`` / ``outputs`` for graphs built by hand.
    input_slots: tuple[str, ...] | None = None
    output_slots: tuple[str, ...] | None = None
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.input_slots is None:
            object.__setattr__(self, "input_slots", self.inputs)
        if self.output_slots is None:
            object.__setattr__(self, "output_slots", self.outputs)

    @property
    def is_default_domain(self) -> bool:
        return self.domain == DEFAULT_DOMAIN

    def int_attribute(self, name: str, default: int) -> int:
        """Attribute ``name`` as an int, ``default`` when the node does not set it."""
        value = self.attributes.get(name, default)
        if isinstance(value, int | float | np.integer):
            return int(value)
        raise ValueError(f"node {self.name!r}: attribute {name!r} is not a number: {value!r}")

    def ints_attribute(self, name: str) -> list[int] | None:
        """Attribute ``name`` as a list of ints, or None when the node does not set it."""
        value = self.attributes.get(name)
        if value is None:
            return None
        if isinstance(value, list | tuple | np.ndarray):
            return [int(v) for v in value]
        raise ValueError(f"node {self.name!r}: attribute {name!r} is not a list of ints: {value!r}")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    tensor: str
    kind: EdgeKind | None


def tensor_nbytes(dtype_itemsize: int | None, shape: tuple[int | str, ...] | None) -> int | None:
    if dtype_itemsize is None or shape is None:
        return None
    dims = [d for d in shape if isinstance(d, int)]
    return dtype_itemsize * math.prod(dims) if len(dims) == len(shape) else None


class Graph:
    """The model as a dependency graph, with every tensor's facts.

    ``constants`` holds the values of small constants (initializers stored in the
    file and ``Constant`` outputs of at most :data:`SMALL_TENSOR_BYTES`): the axes,
    shapes and pads passes read. ``opset`` is the default domain's operator set
    version (None for graphs that do not come from an ONNX file).

    Edges live in plain dicts, in the order they were added; ``nx`` builds the
    networkx view handed to users (``CompiledModel.graph``) on first use. Importing
    networkx alone adds about 19 MiB to a process, which a compile under a memory
    cap cannot afford for a view nobody asked for.
    """

    def __init__(self, nodes: list[NodeInfo], tensors: Mapping[str, TensorInfo],
                 inputs: tuple[str, ...], outputs: tuple[str, ...], *,
                 constants: Mapping[str, np.ndarray] | None = None, opset: int | None = None) -> None:
        self.nodes: dict[str, NodeInfo] = {n.name: n for n in nodes}
        self.tensors: dict[str, TensorInfo] = dict(tensors)
        self.inputs = inputs
        self.outputs = outputs
        self.constants: Mapping[str, np.ndarray] = dict(constants or {})
        self.opset = opset
        # src -> dst -> tensor -> kind, and dst -> src: insertion-ordered adjacency.
        self._succ: dict[str, dict[str, dict[str, EdgeKind | None]]] = {n.name: {} for n in nodes}
        self._pred: dict[str, dict[str, None]] = {n.name: {} for n in nodes}
        self._nx: NetworkxGraph | None = None
        for node in nodes:
            for name in dict.fromkeys(node.inputs):
                producer = self.tensors[name].producer
                if producer is not None:
                    self._succ[producer].setdefault(node.name, {})[name] = None
                    self._pred[node.name][producer] = None

    def with_tensors(self, tensors: Mapping[str, TensorInfo]) -> Graph:
        """The same nodes, constants and edge kinds over another tensor table (resized tensors)."""
        graph = Graph(list(self.nodes.values()), tensors, self.inputs, self.outputs,
                      constants=self.constants, opset=self.opset)
        for edge in self.edges():
            if edge.kind is not None:
                graph.set_edge_kind(edge.src, edge.dst, edge.tensor, edge.kind)
        return graph

    @property
    def nx(self) -> NetworkxGraph:
        """The networkx view: one node per ONNX node (attr ``op_type``), one edge per
        (producer, consumer, tensor) keyed by the tensor (attrs ``tensor``, ``bytes``, ``kind``)."""
        if self._nx is None:
            import networkx

            view = networkx.MultiDiGraph()
            for node in self.nodes.values():
                view.add_node(node.name, op_type=node.op_type)
            for edge in self.edges():
                view.add_edge(edge.src, edge.dst, key=edge.tensor, tensor=edge.tensor,
                              bytes=self.tensors[edge.tensor].nbytes, kind=edge.kind)
            self._nx = view
        return self._nx

    # -- reading -----------------------------------------------------------------
    def file_order(self) -> tuple[str, ...]:
        return tuple(self.nodes)

    def edges(self) -> Iterator[Edge]:
        for src, targets in self._succ.items():
            for dst, tensors in targets.items():
                for tensor, kind in tensors.items():
                    yield Edge(src, dst, tensor, kind)

    def edge_tensors(self, src: str, dst: str) -> tuple[str, ...]:
        """The tensors ``src`` hands to ``dst`` (one edge each), in the order they were added."""
        return tuple(self._succ[src][dst])

    def edge_kind(self, src: str, dst: str, tensor: str) -> EdgeKind | None:
        return self._succ[src][dst][tensor]

    def set_edge_kind(self, src: str, dst: str, tensor: str, kind: EdgeKind) -> None:
        self._succ[src][dst][tensor] = kind
        if self._nx is not None:
            self._nx.edges[src, dst, tensor]["kind"] = kind

    def successors(self, node: str) -> tuple[str, ...]:
        """The distinct nodes reading an output of ``node``, in the order their edges were added."""
        return tuple(self._succ[node])

    def predecessors(self, node: str) -> tuple[str, ...]:
        """The distinct nodes producing an input of ``node``, in the order their edges were added."""
        return tuple(self._pred[node])

    def producer_of(self, tensor: str) -> str | None:
        return self.tensors[tensor].producer

    def is_weight(self, tensor: str) -> bool:
        return self.tensors[tensor].role is TensorRole.WEIGHT

    def weights_of(self, node: str) -> tuple[str, ...]:
        return tuple(t for t in dict.fromkeys(self.nodes[node].inputs) if self.is_weight(t))

    def weight_bytes(self) -> int:
        return sum(t.nbytes or 0 for t in self.tensors.values() if t.role is TensorRole.WEIGHT)

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of a small constant tensor, or None (not constant, or too large to carry)."""
        return self.constants.get(tensor)

    # -- order ---------------------------------------------------------------------
    def topological_order(self, key: Callable[[str], Any] | None = None) -> tuple[str, ...]:
        """Every node after the producers of its inputs (Kahn's algorithm).

        With ``key``: the ready node of the smallest key first (ties: the earlier node
        of the file). Without: generation by generation, each generation in the order
        its nodes became ready (as networkx's ``topological_sort``). Raises
        :class:`PassError` on a cycle.
        """
        waiting = {name: len(preds) for name, preds in self._pred.items()}
        order: list[str] = []
        if key is None:
            generation = [name for name, count in waiting.items() if count == 0]
            while generation:
                order += generation
                generation = [dst for src in generation for dst in self._succ[src] if _ready(waiting, dst)]
        else:
            position = {name: i for i, name in enumerate(self.nodes)}
            heap = [(key(name), position[name], name) for name, count in waiting.items() if count == 0]
            heapq.heapify(heap)
            while heap:
                name = heapq.heappop(heap)[2]
                order.append(name)
                for dst in self._succ[name]:
                    if _ready(waiting, dst):
                        heapq.heappush(heap, (key(dst), position[dst], dst))
        if len(order) < len(self.nodes):
            raise PassError(f"graph has a cycle through nodes {list(self.find_cycle() or ())}")
        return tuple(order)

    def is_topological_order(self, order: Iterable[str]) -> bool:
        """Does ``order`` hold every node once, each after the producers of its inputs?"""
        order = tuple(order)
        if len(order) != len(self.nodes) or set(order) != set(self.nodes):
            return False
        position = {node: i for i, node in enumerate(order)}
        return all(position[src] < position[dst] for src, targets in self._succ.items() for dst in targets)

    def find_cycle(self) -> tuple[str, ...] | None:
        """The nodes of one dependency cycle, in order (the last feeds the first), or None.

        Depth-first from every node in file order, iteratively (graphs have tens of
        thousands of nodes; recursion would overflow Python's stack)."""
        state: dict[str, int] = {}              # 1: on the current path, 2: done
        for root in self.nodes:
            if root in state:
                continue
            path, stack = [root], [iter(self._succ[root])]
            state[root] = 1
            while stack:
                dst = next(stack[-1], None)
                if dst is None:
                    state[path.pop()] = 2
                    stack.pop()
                elif state.get(dst) == 1:
                    return tuple(path[path.index(dst):])
                elif dst not in state:
                    state[dst] = 1
                    path.append(dst)
                    stack.append(iter(self._succ[dst]))
        return None

    # -- invariants ----------------------------------------------------------------
    def verify(self, *, require_kinds: bool = False, require_sizes: bool = False) -> None:
        """Raise :class:`PassError` if an invariant of the IR does not hold."""
        cycle = self.find_cycle()
        if cycle is not None:
            raise PassError(f"graph has a cycle through nodes {list(cycle)}")
        for node in self.nodes.values():
            for name in node.inputs + node.outputs:
                if name not in self.tensors:
                    raise PassError(f"node {node.name!r} uses tensor {name!r} missing from the tensor table")
        if require_kinds:
            unclassified = self.unclassified_edge()
            if unclassified is not None:
                e = unclassified
                raise PassError(f"edge {e.src} -> {e.dst} ({e.tensor}) has no kind")
        if require_sizes:
            unsized = [t.name for t in self.tensors.values() if t.nbytes is None]
            if unsized:
                raise PassError(f"tensor {unsized[0]!r} has no known size")

    def unclassified_edge(self) -> Edge | None:
        return next((e for e in self.edges() if e.kind is None), None)


def _ready(waiting: dict[str, int], node: str) -> bool:
    """Count one producer of ``node`` done; True once none is left."""
    waiting[node] -= 1
    return waiting[node] == 0
