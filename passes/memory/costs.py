"""What an onnxruntime CPU session holds, in bytes: the rules the plan accounts.

Measured with onnxruntime 1.32 (CPU execution provider, memory arena off) on
external-data weights:

* When a session is created, onnxruntime maps each external-data weight and
  reads it. A weight that a kernel pre-packs (the B operand of a float32
  MatMul or Gemm: MLAS copies it into panels 16 columns wide) is copied into
  the packed layout and its mapping is released, one weight at a time. A
  weight no kernel pre-packs stays mapped for the session's life; its pages
  count in RSS once they have been read.
* So a live session holds, per weight, its packed size (columns rounded up to
  16) if it is pre-packed -- plus the original if another node also reads it
  unpacked -- and its plain size otherwise: :func:`held_bytes`.
* While a session is being created it holds, on top of that, the original of
  the weight being packed, at most the largest one (``passes/segment.py``
  accounts it).
* A session's own bookkeeping (graph, kernels) is about 120 KiB.
  :data:`SESSION_OVERHEAD_BYTES` is charged for every session the plan keeps
  alive across runs (the weight cache); the one or two sessions a run works
  with fall in the fixed allowance of the RSS promise, with onnxruntime's code
  and Hyperion's own data.

Weights embedded in the ONNX file are turned into external data first
(:mod:`hyperion.frontend.embedded`), so the same rules hold for them. With pre-packing
off (``session.disable_prepacking``, ``compile(prepack_weights=False)``) every
weight stays mapped at its own size and creating a session holds nothing more;
``passes/segment.py`` applies that rule itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from hyperion.ir import Graph

SESSION_OVERHEAD_BYTES = 128 * 1024
MLAS_PANEL_COLUMNS = 16          # MLAS packs SGEMM's B operand in panels this wide
_PREPACKED_INPUT = {"MatMul": 1, "Gemm": 1}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def packed_bytes(graph: Graph, weight: str) -> int | None:
    """Bytes of the pre-packed copy of ``weight``, or None if no kernel packs it."""
    info = graph.tensors[weight]
    if info.dtype != "float32" or info.shape is None or len(info.shape) != 2:
        return None
    for consumer in info.consumers:
        node = graph.nodes[consumer]
        index = _PREPACKED_INPUT.get(node.op_type)
        if not node.is_default_domain or index is None or len(node.inputs) <= index \
                or node.inputs[index] != weight:
            continue
        rows, cols = int(info.shape[0]), int(info.shape[1])
        if node.op_type == "MatMul":
            return rows * _round_up(cols, MLAS_PANEL_COLUMNS) * 4
        # Gemm may read the weight transposed (transB): take the larger of both layouts.
        return max(rows * _round_up(cols, MLAS_PANEL_COLUMNS), cols * _round_up(rows, MLAS_PANEL_COLUMNS)) * 4
    return None


def _read_unpacked(graph: Graph, weight: str) -> bool:
    """Whether some node reads ``weight`` other than as a pre-packed operand."""
    for consumer in graph.tensors[weight].consumers:
        node = graph.nodes[consumer]
        index = _PREPACKED_INPUT.get(node.op_type)
        if index is None or [i for i, name in enumerate(node.inputs) if name == weight] != [index]:
            return True
    return False


def resident_bytes(graph: Graph, weight: str) -> int:
    """What a live session holds for ``weight``."""
    plain = graph.tensors[weight].nbytes or 0
    packed = packed_bytes(graph, weight)
    if packed is None:
        return plain
    return packed + (plain if _read_unpacked(graph, weight) else 0)


def held_bytes(graph: Graph, weights: Iterable[str]) -> int:
    """What a live session over ``weights`` holds for them."""
    return sum(resident_bytes(graph, w) for w in set(weights))
