"""The numbers an order's peak is made of, indexed by node position for the ordering search.

An order's cost is the peak of :func:`hyperion.passes.liveness.step_live_bytes`. Written
over the set ``S`` of nodes already run, the rules of ``passes/liveness.py`` become:

* ``resident(S)`` — bytes alive between steps: every graph input or output of a node in
  ``S`` that a node outside ``S`` still reads, plus every graph output produced so far
  (graph outputs are never freed; graph inputs are resident from before step 0);
* running node ``v`` next costs ``resident(S) + outputs(v) + weights(v)``: its inputs are
  resident already, all its outputs count at its step (an output nobody reads dies there),
  and ``weights(v)`` is its own weights in ``memory_opt`` mode, every weight in ``normal``
  mode (a constant, kept apart in :attr:`StepModel.constant_bytes`);
* afterwards ``resident`` gains the outputs someone reads (or graph outputs) and loses each
  input ``v`` was the last reader of.

Because ``resident`` depends on the set ``S`` only, not on the order that ran it, the
search can work on sets (dynamic programming over sets of executed nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hyperion.ir import ExecutionMode, Graph, TensorRole


@dataclass(frozen=True)
class StepModel:
    names: tuple[str, ...]                         # node names; a node's index is its base position
    preds: tuple[tuple[int, ...], ...]             # distinct producers of each node's inputs
    succs: tuple[tuple[int, ...], ...]             # distinct readers of each node's outputs
    step_bytes: tuple[int, ...]                    # outputs(v) + weights(v), constant excluded
    kept_bytes: tuple[int, ...]                    # outputs that outlive the step
    reads: tuple[tuple[int, ...], ...]             # freeable tensors each node reads (tensor ids)
    inert: tuple[bool, ...]                        # reads no data and pays nothing for weights
    tensor_bytes: tuple[int, ...]                  # per freeable tensor id
    tensor_readers: tuple[tuple[int, ...], ...]    # per freeable tensor id, distinct readers
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


def build_step_model(graph: Graph, base: Sequence[str], mode: ExecutionMode) -> StepModel:
    """The model of ``graph`` with node indices given by the topological order ``base``."""
    index = {name: i for i, name in enumerate(base)}
    outputs = set(graph.outputs)
    tensor_id: dict[str, int] = {}
    tensor_bytes: list[int] = []
    tensor_readers: list[tuple[int, ...]] = []
    initial = 0
    for tensor in graph.tensors.values():
        if tensor.role is TensorRole.WEIGHT:
            continue
        size = tensor.nbytes or 0
        readers = tuple(sorted({index[c] for c in tensor.consumers}))
        if tensor.producer is None and (readers or tensor.name in outputs):
            initial += size
        if readers and tensor.name not in outputs:
            tensor_id[tensor.name] = len(tensor_bytes)
            tensor_bytes.append(size)
            tensor_readers.append(readers)

    preds, succs, step, kept, reads, inert = [], [], [], [], [], []
    for name in base:
        node = graph.nodes[name]
        data_inputs = [t for t in dict.fromkeys(node.inputs) if not graph.is_weight(t)]
        own_weights = 0 if mode is ExecutionMode.NORMAL else sum(
            graph.tensors[w].nbytes or 0 for w in graph.weights_of(name))
        out_sizes = [(graph.tensors[t].nbytes or 0, bool(graph.tensors[t].consumers) or t in outputs)
                     for t in node.outputs]
        preds.append(tuple(sorted({index[p] for t in data_inputs
                                   if (p := graph.tensors[t].producer) is not None})))
        succs.append(tuple(sorted({index[c] for t in node.outputs for c in graph.tensors[t].consumers})))
        step.append(sum(s for s, _ in out_sizes) + own_weights)
        kept.append(sum(s for s, k in out_sizes if k))
        reads.append(tuple(tensor_id[t] for t in data_inputs if t in tensor_id))
        inert.append(not data_inputs and own_weights == 0)
    constant = graph.weight_bytes() if mode is ExecutionMode.NORMAL else 0
    return StepModel(tuple(base), tuple(preds), tuple(succs), tuple(step), tuple(kept), tuple(reads),
                     tuple(inert), tuple(tensor_bytes), tuple(tensor_readers), initial, constant)
