"""The numbers an order's peak is made of, indexed by node position for the ordering search.

An order's cost is the peak of :func:`hyperion.passes.liveness.step_live_bytes`. Written
over the set ``S`` of nodes already run, the rules of ``passes/liveness.py`` become:

* ``resident(S)`` — bytes alive between steps: every graph input or output of a node in
  ``S`` that a node outside ``S`` still reads, plus every graph output produced so far
  (graph outputs are never freed; graph inputs are resident from before step 0);
* running node ``v`` next costs ``resident(S) + outputs(v) + weights(v)``: its inputs are
  resident already, all its outputs count at its step (an output nobody reads dies there),
  and ``weights(v)`` is its own weights in ``memory_opt`` mode, every weight in ``normal``
  mode (a constant, kept apart in :attr:`StepModel.constant_bytes`), plus its kernel's
  workspace (``passes/memory/costs.py``);
* afterwards ``resident`` gains the outputs someone reads (or graph outputs) and loses each
  input ``v`` was the last reader of.

Because ``resident`` depends on the set ``S`` only, not on the order that ran it, the
search can work on sets (dynamic programming over sets of executed nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hyperion.ir import ExecutionMode, Graph, TensorRole
from hyperion.passes.memory.costs import workspace_bytes


@dataclass(frozen=True)
class StepModel:
    names: tuple[str, ...]                         # node names; a node's index is its base position
    preds: tuple[tuple[int, ...], ...]             # distinct producers of each node's inputs
    succs: tuple[tuple[int, ...], ...]             # distinct readers of each node's outputs
    step_bytes: tuple[int, ...]                    # outputs(v) + weights(v), constant excluded
    kept_bytes: tuple[int, ...]                    # outputs that outlive the step
    reads: tuple[tuple[int, ...], ...]             # freeable tensors each node reads (tensor ids)
    reads_data: tuple[bool, ...]                   # reads a graph input or another node's output
    weight_bytes: tuple[int, ...]                  # the part of step_bytes that is the node's own weights
    tensor_bytes: tuple[int, ...]                  # per freeable tensor id
    tensor_readers: tuple[tuple[int, ...], ...]    # per freeable tensor id, distinct readers
    tensor_producer: tuple[int, ...]               # per freeable tensor id; -1: a graph input
    initial_bytes: int                             # resident before step 0: graph inputs
    constant_bytes: int                            # every weight in normal mode, else 0

    @property
    def size(self) -> int:
        return len(self.names)

    def peak(self, order: Sequence[int]) -> int:
        """The peak of step_live_bytes for ``order`` (node indices), in O(nodes + tensors)."""
        pending = [len(r) for r in self.tensor_readers]
        resident, peak = self.initial_bytes, 0
        for v in order:
            peak = max(peak, resident + self.step_bytes[v])
            resident += self.kept_bytes[v]
            for t in self.reads[v]:
                pending[t] -= 1
                if pending[t] == 0:
                    resident -= self.tensor_bytes[t]
        return (peak + self.constant_bytes) if order else 0

    def floating(self) -> list[bool]:
        """Per node: it reads no data, every output it makes is read later, and its own
        weights cost no more than any reader's step (a ``Constant``, a generated weight).
        Such a node is a source, and some optimal order runs it right before its first
        reader (``passes/order_regions.py``)."""
        return [not self.reads_data[v] and bool(self.succs[v])
                and self.step_bytes[v] - self.weight_bytes[v] == self.kept_bytes[v]
                and all(self.weight_bytes[v] <= self.step_bytes[c] for c in self.succs[v])
                for v in range(self.size)]

    def step_lower_bound(self) -> int:
        """No order peaks lower (constant excluded): every step holds at least the inputs it
        reads, its outputs and its weights, whatever runs before it."""
        return max((self.step_bytes[v] + sum(self.tensor_bytes[t] for t in self.reads[v])
                    for v in range(self.size)), default=0)


def build_step_model(graph: Graph, base: Sequence[str], mode: ExecutionMode) -> StepModel:
    """The model of ``graph`` with node indices given by the topological order ``base``."""
    index = {name: i for i, name in enumerate(base)}
    outputs = set(graph.outputs)
    sizes: dict[str, int] = {}
    readers: dict[str, tuple[int, ...]] = {}
    producer: dict[str, int] = {}
    tensor_id: dict[str, int] = {}
    tensor_bytes: list[int] = []
    tensor_readers: list[tuple[int, ...]] = []
    tensor_producer: list[int] = []
    initial = 0
    weight_role = TensorRole.WEIGHT
    for name, tensor in graph.tensors.items():
        size = sizes[name] = tensor.nbytes or 0
        if tensor.role is weight_role:
            continue
        consumers = tensor.consumers
        readers[name] = tuple(sorted({index[c] for c in consumers})) if len(consumers) > 1 else \
            tuple(index[c] for c in consumers)
        if tensor.producer is None:
            initial += size if consumers or name in outputs else 0
        else:
            producer[name] = index[tensor.producer]
        if consumers and name not in outputs:
            tensor_id[name] = len(tensor_bytes)
            tensor_bytes.append(size)
            tensor_readers.append(readers[name])
            tensor_producer.append(producer.get(name, -1))

    normal = mode is ExecutionMode.NORMAL
    preds, succs, step, kept, reads, reads_data, weight_bytes = [], [], [], [], [], [], []
    for name in base:
        node = graph.nodes[name]
        inputs = dict.fromkeys(node.inputs)
        data = [t for t in inputs if t in readers]
        own_weights = 0 if normal else sum(sizes[t] for t in inputs if t not in readers)
        preds.append(tuple(sorted({producer[t] for t in data if t in producer})))
        succs.append(tuple(sorted({c for t in node.outputs for c in readers[t]})))
        step.append(sum(sizes[t] for t in node.outputs) + own_weights + workspace_bytes(graph, node, weights_fed=False))
        kept.append(sum(sizes[t] for t in node.outputs if readers[t] or t in outputs))
        reads.append(tuple(tensor_id[t] for t in data if t in tensor_id))
        reads_data.append(bool(data))
        weight_bytes.append(own_weights)
    constant = graph.weight_bytes() if normal else 0
    return StepModel(tuple(base), tuple(preds), tuple(succs), tuple(step), tuple(kept), tuple(reads),
                     tuple(reads_data), tuple(weight_bytes), tuple(tensor_bytes), tuple(tensor_readers),
                     tuple(tensor_producer), initial, constant)
