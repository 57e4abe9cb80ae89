"""tile: steps that read only part of a weight (see :class:`TilePass`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hyperion.ir import SMALL_TENSOR_BYTES, ExecutionMode, Graph, NodeInfo, TensorInfo
from hyperion.passes._infra import Pass, PassResult, ensure, require
from hyperion.passes.program import Program

# A table smaller than this is read whole: a few pages, not worth a step of its own.
ROW_GATHER_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class RowGather:
    """A Gather (axis 0) over a weight that reads only the rows its indices name."""

    node: str
    weight: str          # the table: read row by row from its file, never mapped
    indices: str
    output: str
    rows: int            # rows in the table (axis 0); indices must lie in [-rows, rows)
    row_bytes: int       # bytes of one row (the product of the other dims, times the item size)
    read_bytes: int      # the most bytes the step reads: distinct indices at most, times row_bytes


@dataclass(frozen=True)
class Tiling:
    """The tile pass's result: the steps that read a weight in part, by node."""

    row_gathers: Mapping[str, RowGather]

    def isolated_steps(self, order: tuple[str, ...]) -> frozenset[int]:
        """Steps run by Hyperion itself, not by a session: each is a segment of its own."""
        return frozenset(i for i, node in enumerate(order) if node in self.row_gathers)


class TilePass(Pass):
    """Steps that need only part of a large weight account only that part.

    Rules (memory_opt planning only: in ``normal`` mode every weight is resident
    anyway, so reading part of one saves nothing):

    1. a ``Gather`` of the default domain along axis 0 whose data input is a weight
       of at least ``ROW_GATHER_MIN_BYTES`` and whose indices have a known element
       count becomes a *row gather*: the step reads the rows its indices name from
       the weight's file (pread, never a mapping: the kernel maps files in large
       folios, so a mapped table costs far more RSS than the rows read) into a
       compact table and gathers from it;
    2. a row gather accounts ``min(index count, rows) * row_bytes`` for the table,
       not the table: the indices name at most that many distinct rows;
    3. only when every reader of the weight is a row gather (another reader would
       load the whole table anyway) and the weight is not a graph output; and only
       when the rows read are fewer than the table's;
    4. a row gather runs outside onnxruntime, so it is a segment of its own (the
       ``segment`` pass reads :meth:`Tiling.isolated_steps`).

    The weight's accounted size in ``program.graph`` becomes the most a row gather
    of it reads (its tensor record's ``bytes`` in the schedule). Writes
    ``program.tiling``. Postcondition: every row gather's node still reads its weight
    and accounts no more than the table.
    """

    name: ClassVar[str] = "tile"

    def requires(self, program: Program) -> None:
        require(program.order is not None, self.name, "an order (the 'order' pass)")

    def call(self, program: Program) -> PassResult:
        graph = program.graph
        gathers = {} if program.planning_mode is ExecutionMode.NORMAL else row_gathers(graph)
        tiling = Tiling(gathers)
        modified = tiling != program.tiling
        program.tiling = tiling
        if gathers:
            program.graph = graph.with_tensors(_accounted(graph, gathers.values()))
        return PassResult(program, modified)

    def ensures(self, program: Program) -> None:
        tiling = program.tiling
        ensure(tiling is not None, self.name, "no tiling was recorded")
        assert tiling is not None
        for gather in tiling.row_gathers.values():
            node = program.graph.nodes[gather.node]
            ensure(node.inputs[0] == gather.weight, self.name, f"node {gather.node!r} does not read {gather.weight!r}")
            ensure(gather.read_bytes <= gather.rows * gather.row_bytes, self.name,
                   f"row gather {gather.node!r} accounts more than its table")


def row_gathers(graph: Graph) -> dict[str, RowGather]:
    """Rule 1-3: the Gathers over large weights that can read only their rows."""
    candidates = {node.name: gather for node in graph.nodes.values()
                  if (gather := _row_gather(graph, node)) is not None}
    readers_ok = {w for w in {g.weight for g in candidates.values()}
                  if all(c in candidates for c in graph.tensors[w].consumers) and w not in graph.outputs}
    return {name: g for name, g in candidates.items() if g.weight in readers_ok}


def _row_gather(graph: Graph, node: NodeInfo) -> RowGather | None:
    if node.op_type != "Gather" or not node.is_default_domain or len(node.inputs) != 2:
        return None
    weight, indices = node.inputs
    table, index = graph.tensors[weight], graph.tensors[indices]
    if not graph.is_weight(weight) or not table.shape or table.dtype not in np.sctypeDict:
        return None
    if node.int_attribute("axis", 0) not in (0, -len(table.shape)):
        return None
    # From the shape, not ``nbytes``: an earlier tile pass may have resized the table's account.
    table_elements, count = _elements(table), _elements(index)
    rows = int(table.shape[0])
    if table_elements is None or count is None or rows == 0:
        return None
    table_bytes = table_elements * np.dtype(table.dtype).itemsize
    if table_bytes < max(ROW_GATHER_MIN_BYTES, SMALL_TENSOR_BYTES):
        return None
    row_bytes = table_bytes // rows
    read = min(count, rows) * row_bytes
    if read >= table_bytes:
        return None
    return RowGather(node.name, weight, indices, node.outputs[0], rows, row_bytes, read)


def _elements(tensor: TensorInfo) -> int | None:
    if tensor.shape is None or not all(isinstance(d, int) for d in tensor.shape):
        return None
    return math.prod(int(d) for d in tensor.shape)


def _accounted(graph: Graph, gathers: Iterable[RowGather]) -> dict[str, TensorInfo]:
    """The tensor table with each row-gathered weight sized as the most one gather of it reads."""
    read: dict[str, int] = {}
    for gather in gathers:
        read[gather.weight] = max(read.get(gather.weight, 0), gather.read_bytes)
    tensors = dict(graph.tensors)
    for weight, nbytes in read.items():
        tensors[weight] = dataclasses.replace(tensors[weight], nbytes=nbytes)
    return tensors
