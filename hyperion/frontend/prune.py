"""The part of an imported model that some of its outputs need.

``restrict_to_outputs(imported, ["logits"])`` keeps the nodes that are ancestors
of the requested outputs and nothing else: the planner then plans (and the
runtime runs) only that subgraph, so dead branches are neither computed nor
held. Every graph input stays an input (onnxruntime, too, wants every input fed
whatever is fetched); graph outputs that were not requested become ordinary
activations, freed after their last use within the subgraph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from hyperion.errors import OptionError
from hyperion.frontend.build import ImportedModel
from hyperion.ir import Graph, TensorRole


def ancestor_nodes(graph: Graph, outputs: Iterable[str]) -> list[str]:
    """The nodes the tensors ``outputs`` depend on (their producers included), in file order."""
    needed: set[str] = set()
    pending = [graph.tensors[name].producer for name in outputs]
    while pending:
        node = pending.pop()
        if node is None or node in needed:
            continue
        needed.add(node)
        pending.extend(graph.tensors[t].producer for t in graph.nodes[node].inputs)
    return [name for name in graph.nodes if name in needed]


def restrict_graph(graph: Graph, outputs: Iterable[str]) -> Graph:
    """``graph`` cut down to the ancestors of ``outputs``, which become its only outputs."""
    wanted = tuple(dict.fromkeys(outputs))
    unknown = [name for name in wanted if name not in graph.outputs]
    if unknown:
        raise OptionError(f"outputs: the model has no output named {unknown[0]!r}; "
                          f"its outputs are {list(graph.outputs)}")
    if not wanted:
        raise OptionError("outputs: ask for at least one output (None asks for all)")
    nodes = [graph.nodes[name] for name in ancestor_nodes(graph, wanted)]
    kept_nodes = {node.name for node in nodes}
    names = dict.fromkeys([*graph.inputs, *wanted, *(t for node in nodes for t in (*node.inputs, *node.outputs))])
    tensors = {}
    for name in names:
        info = graph.tensors[name]
        role = TensorRole.ACTIVATION if info.role is TensorRole.OUTPUT and name not in wanted else info.role
        tensors[name] = dataclasses.replace(
            info, role=role, consumers=tuple(c for c in info.consumers if c in kept_nodes))
    constants = {name: value for name, value in graph.constants.items() if name in tensors}
    return Graph(nodes, tensors, graph.inputs, wanted, constants=constants, opset=graph.opset)


def restrict_to_outputs(imported: ImportedModel, outputs: Iterable[str]) -> ImportedModel:
    """``imported`` with only what ``outputs`` need (itself when they are all its outputs)."""
    wanted = tuple(dict.fromkeys(outputs))
    if set(wanted) == set(imported.graph.outputs):
        return imported
    return dataclasses.replace(imported, graph=restrict_graph(imported.graph, wanted))


def is_whole_graph(imported: ImportedModel, graph: Graph) -> bool:
    """Does ``graph`` hold every node and every output of the user's model (not a restriction)?"""
    proto = imported.source.proto.graph
    return len(graph.nodes) == len(proto.node) and set(graph.outputs) == {o.name for o in proto.output}
