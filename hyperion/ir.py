"""Hyperion's IR: an ONNX graph as a ``networkx.MultiDiGraph`` plus a tensor table.

One graph node per ONNX node, one edge per (producer, consumer, tensor). Graph
inputs and weights have no producer node, so no edge: a node reached only from
them depends on nothing (the seed's ``HYPERION_DEP_NONE``). Code outside this
module reads the graph through :class:`Graph`, not raw networkx attribute dicts.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import networkx as nx

from hyperion.errors import PassError

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


@dataclass(frozen=True)
class NodeInfo:
    name: str                 # unique within the graph
    op_type: str
    domain: str
    inputs: tuple[str, ...]   # non-empty inputs, then outer-scope tensors its subgraphs read
    outputs: tuple[str, ...]  # non-empty outputs
    index: int                # position in the ONNX file's node list


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    tensor: str
    kind: EdgeKind | None


def tensor_nbytes(dtype_itemsize: int | None, shape: tuple[int | str, ...] | None) -> int | None:
    if dtype_itemsize is None or shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return dtype_itemsize * math.prod(shape)


class Graph:
    """The model as a dependency graph, with every tensor's facts."""

    def __init__(self, nodes: list[NodeInfo], tensors: Mapping[str, TensorInfo],
                 inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        self.nx = nx.MultiDiGraph()
        self.nodes: dict[str, NodeInfo] = {n.name: n for n in nodes}
        self.tensors: dict[str, TensorInfo] = dict(tensors)
        self.inputs = inputs
        self.outputs = outputs
        for node in nodes:
            self.nx.add_node(node.name, op_type=node.op_type)
        for node in nodes:
            for name in dict.fromkeys(node.inputs):
                producer = self.tensors[name].producer
                if producer is not None:
                    self.nx.add_edge(producer, node.name, key=name, tensor=name,
                                     bytes=self.tensors[name].nbytes, kind=None)

    # -- reading -----------------------------------------------------------------
    def file_order(self) -> tuple[str, ...]:
        return tuple(self.nodes)

    def edges(self) -> Iterator[Edge]:
        for src, dst, data in self.nx.edges(data=True):
            yield Edge(src, dst, data["tensor"], data["kind"])

    def edge_kind(self, src: str, dst: str, tensor: str) -> EdgeKind | None:
        return self.nx.edges[src, dst, tensor]["kind"]

    def set_edge_kind(self, src: str, dst: str, tensor: str, kind: EdgeKind) -> None:
        self.nx.edges[src, dst, tensor]["kind"] = kind

    def producer_of(self, tensor: str) -> str | None:
        return self.tensors[tensor].producer

    def is_weight(self, tensor: str) -> bool:
        return self.tensors[tensor].role is TensorRole.WEIGHT

    def weights_of(self, node: str) -> tuple[str, ...]:
        return tuple(t for t in dict.fromkeys(self.nodes[node].inputs) if self.is_weight(t))

    def weight_bytes(self) -> int:
        return sum(t.nbytes or 0 for t in self.tensors.values() if t.role is TensorRole.WEIGHT)

    # -- invariants ----------------------------------------------------------------
    def verify(self, *, require_kinds: bool = False, require_sizes: bool = False) -> None:
        """Raise :class:`PassError` if an invariant of the IR does not hold."""
        if not nx.is_directed_acyclic_graph(self.nx):
            cycle = nx.find_cycle(self.nx)
            raise PassError(f"graph has a cycle through nodes {[e[0] for e in cycle]}")
        for node in self.nodes.values():
            for name in node.inputs + node.outputs:
                if name not in self.tensors:
                    raise PassError(f"node {node.name!r} uses tensor {name!r} missing from the tensor table")
        if require_kinds:
            unclassified = [e for e in self.edges() if e.kind is None]
            if unclassified:
                e = unclassified[0]
                raise PassError(f"edge {e.src} -> {e.dst} ({e.tensor}) has no kind")
        if require_sizes:
            unsized = [t.name for t in self.tensors.values() if t.nbytes is None]
            if unsized:
                raise PassError(f"tensor {unsized[0]!r} has no known size")


@dataclass
class Program:
    """What the passes work on: the graph, the options, and the analyses so far."""

    graph: Graph
    mode: ExecutionMode = ExecutionMode.NORMAL
    memory_limit: int | None = None
    order: tuple[str, ...] | None = None
    order_result: object | None = None  # passes.order.OrderResult: peak, proven optimum, winner
    liveness: object | None = None      # passes.liveness.Liveness
    memory_plan: object | None = None   # passes.plan_memory.MemoryPlan
    segmentation: object | None = None  # passes.segment.Segmentation
    notes: dict[str, object] = field(default_factory=dict)
