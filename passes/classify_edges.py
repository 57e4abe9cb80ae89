"""classify_edges: give every edge of the graph a kind.

Rules, in order of precedence (an edge takes the first that matches):

1. ``attention`` — the edge carries a query, key, value, score or mask
   activation into an attention computation:
   * any activation edge into ``Attention``, ``MultiHeadAttention`` or
     ``GroupQueryAttention`` (com.microsoft or the default domain);
   * along ``MatMul(Q, Kᵀ) [→ Mul/Div scale] [→ Add mask] → Softmax
     [→ Dropout/Cast] → MatMul(·, V)`` where Q, K and V are activations, not
     weights: the Q and K edges into the first MatMul, every edge of the chain,
     the mask edge into the Add and the V edge into the last MatMul.
2. ``residual`` — a skip connection. An edge u→v is residual when another path
   u→…→v of length ≥ 2 exists (an identity shortcut). A projection shortcut
   counts too: when u reaches a summing join w (Add, Sum) through a chain of
   single-input, single-consumer nodes (u→v→…→w, e.g. a 1×1 Conv and a
   BatchNormalization) and through another path that is strictly longer, the
   chain's first edge u→v is residual. For a chain of one edge this is exactly
   the identity rule. Joins that are not sums (Concat of Inception branches,
   the MatMul that reads V in attention) take only the identity rule.
3. ``sequential`` — every other edge.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from hyperion.ir import EdgeKind, Graph, Program
from hyperion.passes import Pass, PassResult

EdgeKey = tuple[str, str, str]  # (src node, dst node, tensor)

ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
ATTENTION_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
SCALE_OPS = frozenset({"Mul", "Div"})
PROBABILITY_PASSTHROUGH_OPS = frozenset({"Dropout", "Cast"})
# Longest projection-shortcut chain looked for; real shortcuts are 1-3 nodes (Conv, BN).
MAX_SHORTCUT_CHAIN = 8
# A projection shortcut rejoins the main path by summation.
SUMMING_JOIN_OPS = frozenset({"Add", "Sum"})


class ClassifyEdgesPass(Pass):
    name: ClassVar[str] = "classify_edges"

    def call(self, program: Program) -> PassResult:
        kinds = classify_edges(program.graph)
        modified = False
        for (src, dst, tensor), kind in kinds.items():
            if program.graph.edge_kind(src, dst, tensor) is not kind:
                program.graph.set_edge_kind(src, dst, tensor, kind)
                modified = True
        return PassResult(program, modified)


def classify_edges(graph: Graph) -> dict[EdgeKey, EdgeKind]:
    """The kind of every edge, by the module's rules."""
    attention = attention_edges(graph)
    residual = residual_edges(graph)
    kinds: dict[EdgeKey, EdgeKind] = {}
    for edge in graph.edges():
        key = (edge.src, edge.dst, edge.tensor)
        kinds[key] = (EdgeKind.ATTENTION if key in attention
                      else EdgeKind.RESIDUAL if key in residual else EdgeKind.SEQUENTIAL)
    return kinds


# -- attention -----------------------------------------------------------------------
def _is_activation(graph: Graph, tensor: str) -> bool:
    if graph.is_weight(tensor):
        return False
    producer = graph.producer_of(tensor)
    return producer is None or graph.nodes[producer].op_type != "Constant"


def _edge_into(graph: Graph, node: str, tensor: str) -> list[EdgeKey]:
    producer = graph.producer_of(tensor)
    return [] if producer is None else [(producer, node, tensor)]


def _single_consumer_node(graph: Graph, tensor: str) -> list[str]:
    return list(dict.fromkeys(graph.tensors[tensor].consumers))


def _match_scores(graph: Graph, tensor: str, allowed: tuple[str, ...]) -> list[EdgeKey] | None:
    """Edges of ``MatMul(Q, Kᵀ) [→ scale] [→ mask Add]`` ending in ``tensor``, or None."""
    node_name = graph.producer_of(tensor)
    if node_name is None:
        return None
    node = graph.nodes[node_name]
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        if all(_is_activation(graph, t) for t in node.inputs):
            return [e for t in node.inputs for e in _edge_into(graph, node_name, t)]
        return None
    if node.op_type not in allowed or len(node.inputs) != 2:
        return None
    below = ("Mul", "Div") if node.op_type == "Add" else ()
    candidates = (0,) if node.op_type == "Div" else (0, 1)
    for i in candidates:
        chain = _match_scores(graph, node.inputs[i], below)
        if chain is None:
            continue
        other = node.inputs[1 - i]
        if node.op_type == "Add":  # the other input is the mask
            extra = _edge_into(graph, node_name, other)
        elif _is_activation(graph, other):  # a scale must be a constant
            continue
        else:
            extra = []
        return chain + _edge_into(graph, node_name, node.inputs[i]) + extra
    return None


def _match_context(graph: Graph, probs: str) -> list[EdgeKey]:
    """Edges from the Softmax output into ``MatMul(·, V)`` [through Dropout/Cast]."""
    edges: list[EdgeKey] = []
    for consumer in _single_consumer_node(graph, probs):
        node = graph.nodes[consumer]
        if node.op_type in PROBABILITY_PASSTHROUGH_OPS and node.outputs:
            after = _match_context(graph, node.outputs[0])
            if after:
                edges += _edge_into(graph, consumer, probs) + after
        elif (node.op_type == "MatMul" and len(node.inputs) == 2 and node.inputs[0] == probs
              and _is_activation(graph, node.inputs[1])):
            edges += _edge_into(graph, consumer, probs) + _edge_into(graph, consumer, node.inputs[1])
    return edges


def attention_edges(graph: Graph) -> set[EdgeKey]:
    edges: set[EdgeKey] = set()
    for node in graph.nodes.values():
        if node.op_type in ATTENTION_OPS and node.domain in ATTENTION_DOMAINS:
            edges.update(e for t in node.inputs if _is_activation(graph, t)
                         for e in _edge_into(graph, node.name, t))
        elif node.op_type == "Softmax" and node.inputs and node.outputs:
            scores = _match_scores(graph, node.inputs[0], ("Add", "Mul", "Div"))
            context = _match_context(graph, node.outputs[0]) if scores is not None else []
            if scores is not None and context:
                edges.update(scores + _edge_into(graph, node.name, node.inputs[0]) + context)
    return edges


# -- residual ------------------------------------------------------------------------
class _Reachability:
    """Descendant sets as Python-int bitsets, built once in reverse topological order.

    networkx answers one reachability query at a time; a skip-connection scan asks
    one per join, so a bitset per node keeps the pass near-linear on large graphs.
    """

    def __init__(self, graph: Graph, order: Iterable[str]) -> None:
        self.graph = graph
        self.bit = {name: 1 << i for i, name in enumerate(order)}
        self.below: dict[str, int] = {}
        for name in reversed(list(self.bit)):
            mask = 0
            for succ in graph.nx.successors(name):
                mask |= self.bit[succ] | self.below[succ]
            self.below[name] = mask

    def reaches(self, src: str, dst: str) -> bool:
        return bool(self.below[src] & self.bit[dst])

    def has_path_of_length(self, src: str, dst: str, at_least: int) -> bool:
        """Is there a path src→…→dst with at least ``at_least`` edges?"""
        memo: dict[tuple[str, int], bool] = {}

        def search(node: str, need: int) -> bool:
            if node == dst:
                return need <= 0
            if need <= 0:
                return self.reaches(node, dst)
            key = (node, need)
            if key not in memo:
                memo[key] = any(search(s, need - 1) for s in set(self.graph.nx.successors(node))
                                if s == dst or self.reaches(s, dst))
            return memo[key]

        return search(src, at_least)


def _distinct_preds(graph: Graph, node: str) -> list[str]:
    return list(dict.fromkeys(graph.nx.predecessors(node)))


def _distinct_succs(graph: Graph, node: str) -> list[str]:
    return list(dict.fromkeys(graph.nx.successors(node)))


def _shortcut_chain(graph: Graph, pred: str, join: str) -> tuple[str, str, int]:
    """Walk back from edge pred→join through single-input, single-consumer nodes.

    Returns (fork u, first node after u, chain length in edges).
    """
    first, length = join, 1
    node = pred
    while length <= MAX_SHORTCUT_CHAIN:
        preds = _distinct_preds(graph, node)
        if len(preds) != 1 or _distinct_succs(graph, node) != [first]:
            break
        first, node, length = node, preds[0], length + 1
    return node, first, length


def residual_edges(graph: Graph) -> set[EdgeKey]:
    reach = _Reachability(graph, _topological(graph))
    edges: set[EdgeKey] = set()
    for join in graph.nodes:
        preds = _distinct_preds(graph, join)
        if len(preds) < 2:
            continue
        sums = graph.nodes[join].op_type in SUMMING_JOIN_OPS
        for pred in preds:
            fork, first, length = _shortcut_chain(graph, pred, join) if sums else (pred, join, 1)
            others = [p for p in preds if p != pred and p != fork and reach.reaches(fork, p)]
            if any(reach.has_path_of_length(fork, p, length) for p in others):
                edges.update((fork, first, key) for key in graph.nx[fork][first])
    return edges


def _topological(graph: Graph) -> list[str]:
    import networkx as nx

    return list(nx.topological_sort(graph.nx))
