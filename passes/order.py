"""order: choose the topological order the steps run in.

Rules:

* the result is a topological order of the graph (every producer before its
  consumers);
* candidates are the ONNX file's node order and a greedy memory-aware order
  (Kahn's algorithm that prefers the ready node freeing the most bytes net);
* the candidate with the lowest peak of accounted live bytes wins, the file's
  order on ties — so the result is never worse than the file's order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx

from hyperion.errors import PassError
from hyperion.ir import ExecutionMode, Graph, Program, TensorRole
from hyperion.passes import Pass, PassResult
from hyperion.passes.liveness import compute_liveness, step_live_bytes

OrderStrategy = Callable[[Graph, ExecutionMode], tuple[str, ...]]


@dataclass(frozen=True)
class OrderPass(Pass):
    name: ClassVar[str] = "order"

    def call(self, program: Program) -> PassResult:
        order = choose_order(program.graph, _planning_mode(program.mode))
        modified = order != program.order
        program.order = order
        return PassResult(program, modified)


def _planning_mode(mode: ExecutionMode) -> ExecutionMode:
    return ExecutionMode.NORMAL if mode is ExecutionMode.NORMAL else ExecutionMode.MEMORY_OPT


def peak_live_bytes(graph: Graph, order: tuple[str, ...], mode: ExecutionMode) -> int:
    return max(step_live_bytes(graph, compute_liveness(graph, order), mode), default=0)


def choose_order(graph: Graph, mode: ExecutionMode,
                 strategies: Sequence[OrderStrategy] | None = None) -> tuple[str, ...]:
    """The lowest-peak order among the file's order and each strategy's."""
    file_order = graph.file_order()
    if not _is_topological(graph, file_order):
        file_order = tuple(nx.lexicographical_topological_sort(graph.nx, key=lambda n: graph.nodes[n].index))
    best, best_peak = file_order, peak_live_bytes(graph, file_order, mode)
    for strategy in strategies if strategies is not None else (greedy_order,):
        candidate = strategy(graph, mode)
        if not _is_topological(graph, candidate):
            raise PassError(f"order strategy {strategy.__name__} returned a non-topological order")
        peak = peak_live_bytes(graph, candidate, mode)
        if peak < best_peak:
            best, best_peak = candidate, peak
    return best


def _is_topological(graph: Graph, order: Sequence[str]) -> bool:
    if len(order) != len(graph.nodes):
        return False
    position = {node: i for i, node in enumerate(order)}
    return all(position[u] < position[v] for u, v in graph.nx.edges())


def greedy_order(graph: Graph, mode: ExecutionMode) -> tuple[str, ...]:
    """Kahn's algorithm preferring the ready node with the best net effect on live bytes.

    A node's net effect is the bytes it allocates (its outputs) minus the bytes of
    the inputs it is the last remaining reader of. Ties go to the file order.
    """
    remaining_readers = {name: len(set(t.consumers)) for name, t in graph.tensors.items()}
    indegree = {n: len(set(graph.nx.predecessors(n))) for n in graph.nodes}

    def net_bytes(node: str) -> int:
        info = graph.nodes[node]
        allocated = sum(graph.tensors[t].nbytes or 0 for t in info.outputs)
        freed = sum(graph.tensors[t].nbytes or 0 for t in set(info.inputs)
                    if remaining_readers[t] == 1 and t not in graph.outputs
                    and (graph.tensors[t].role is not TensorRole.WEIGHT or mode is not ExecutionMode.NORMAL))
        return allocated - freed

    ready = [(net_bytes(n), graph.nodes[n].index, n) for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        touched: set[str] = set()
        for tensor in set(graph.nodes[node].inputs):
            remaining_readers[tensor] -= 1
            touched.update(graph.tensors[tensor].consumers)
        for succ in set(graph.nx.successors(node)):
            indegree[succ] -= 1
            if indegree[succ] == 0:
                heapq.heappush(ready, (net_bytes(succ), graph.nodes[succ].index, succ))
        # A node's score changes when an input it shares loses a reader: re-score those still ready.
        stale = [entry for entry in ready if entry[2] in touched]
        if stale:
            ready = [entry for entry in ready if entry[2] not in touched]
            ready.extend((net_bytes(n), graph.nodes[n].index, n) for _, _, n in stale)
            heapq.heapify(ready)
    return tuple(order)
