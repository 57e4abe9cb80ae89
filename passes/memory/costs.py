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
  the weight being packed, at most the largest one, and the copies onnxruntime's
  BatchNormalization fusion and NCHWc layout transformer make of its Conv weights
  (:func:`rewrite_bytes`; ``passes/segment.py`` accounts both).
* A session's own bookkeeping (graph, kernels, its intra-op thread pool): measured by
  ``benchmarks/session_rss.py`` -- per kind of session the runtime keeps, the slope of a
  fresh process's VmRSS after two runs over the number of sessions kept (4 and 16 segments of
  ``Conv -> Sigmoid -> Mul`` blocks, 16 channels at 16x16; tiles: 1024x1024 MatMuls under a
  3.5 MiB cap), KiB per kept session: the medians of two invocations (2 and 3 processes a
  figure), on a machine shared with other work:

  ==================  ==========  ==========  ==========  ==========
  nodes per session   3           12          48          192
  ==================  ==========  ==========  ==========  ==========
  fed segment         280, 339    374, 602    387, 775    882, 829
  relaid segment      98, 101     137, 138    256, 259    760, 746
  cached (fed plan)   159, 162    206, 204    369, 376    980, 973
  region              237, 271    531, 513    368, 461    821, 878
  ==================  ==========  ==========  ==========  ==========

  A relaid tile's session (one per tile) measured 166 KiB (150-174) and a fed tile's (one
  per tile width) 356 (248-364), each with a share of the one-node segment between the
  tiled steps. A fed segment's figure depends on whether its own intra-op worker thread ran
  part of its kernels (its stack and heap then stay touched): with ``intra_op_num_threads=1``
  the same 48-node sessions measured 281 KiB against 884 in the same minute with the
  default two. On the YOLO-style detector at a quarter of onnxruntime's RSS, dropping its 14
  kept sessions (392 nodes) released 2.8 MiB (200 KiB a session), where 21 sessions
  released 4.3 MiB. :func:`session_bookkeeping_bytes` charges ``SESSION_OVERHEAD_BYTES``
  (relaid: ``RELAID_SESSION_OVERHEAD_BYTES``) plus ``SESSION_NODE_BYTES`` per node: the
  overheads at or above the median of every kind but the fed one's loaded spread; per node
  more than the 3-4 KiB of these chains, as measured earlier on real ops (20 sessions of
  small Convs: 454 KiB each), because at 4 KiB a node the light DenseNet-121 at 25% and
  Inception-v2 at 50% of onnxruntime's RSS were planned and ran 1.6 and 2.3 MiB past the
  RSS promise (``tests/test_rss.py``). That is charged for every session the
  plan keeps alive across runs (every session of a normal or fed plan, a region's, the
  weight cache of a packed one, and the one-node sessions a tiled step keeps: one per
  relaid tile, one per fed tile width), beyond the first
  ``SESSION_BOOKKEEPING_ALLOWANCE_BYTES``; those, and the one or two short-lived sessions a
  packed run works with, fall in the fixed allowance of the RSS promise, with
  onnxruntime's code and Hyperion's own data.
* Some kernels allocate a workspace while they run, beyond their inputs and
  outputs: :func:`workspace_bytes`.

Weights embedded in the ONNX file are turned into external data first
(:mod:`hyperion.frontend.embedded`), so the same rules hold for them. With pre-packing
off (``session.disable_prepacking``, ``compile(prepack_weights=False)``) every
weight stays mapped at its own size and creating a session holds nothing more;
``passes/segment.py`` applies that rule itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from hyperion.ir import SMALL_TENSOR_BYTES, Graph, NodeInfo

SESSION_OVERHEAD_BYTES = 256 * 1024
SESSION_NODE_BYTES = 12 * 1024
RELAID_SESSION_OVERHEAD_BYTES = 128 * 1024
# The RSS promise's fixed allowance (32 MiB over the import baseline) holds onnxruntime's
# code paged in by the first session (8.5 MiB), Hyperion's compile (5-20 MiB) and the
# first few MiB of session bookkeeping: only what persistent sessions hold beyond that
# is charged against the cap.
SESSION_BOOKKEEPING_ALLOWANCE_BYTES = 4 * 2**20
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


# Creating a session whose convolutions have constant weights (pre-packing off, arena off;
# VmHWM over the process before):
#
#   one 3x3 Conv of 1024 channels (36 MiB of weight)                                    +144 MiB
#   ResNet-50's first 47.5 MiB of Conv weights (BatchNormalization folded on export)   +97.9 MiB
#   Conv -> BatchNormalization -> Relu, 512 ch 3x3 (9 MiB a weight), 1 / 4 layers       +53.4 / +152.4 MiB
#   onnx's light Inception-v2 / ResNet-50 (43 / 97 MiB of Conv weights)   +65 / +169 MiB over what they hold
#
# i.e. about 20 MiB once (onnxruntime's code and optimizer paged in) plus, per byte of
# weight, the byte read and one more for the NCHWc re-layout -- 2.7 more when a
# BatchNormalization is folded first (a scaled weight is written, then re-laid, while the
# original is held) -- and the largest weight twice more while the session copies the
# rewritten weights into its own tensors.
_RELAYOUT_COPIES = 1            # the NCHWc re-laid copy
_FOLDED_RELAYOUT_COPIES = 3     # the scaled weight and its re-laid copy, rounded up


def relayout_bytes(graph: Graph, node: NodeInfo) -> int:
    """The copies onnxruntime's optimizer makes of convolution ``node``'s weight when that
    weight is a constant of the session (0 for any other node); see :func:`rewrite_bytes`."""
    if node.op_type != "Conv" or not node.is_default_domain or len(node.inputs) < 2 \
            or not graph.is_weight(node.inputs[1]):
        return 0
    folded = any(graph.nodes[n].op_type == "BatchNormalization" for n in graph.successors(node.name))
    return (_FOLDED_RELAYOUT_COPIES if folded else _RELAYOUT_COPIES) * (graph.tensors[node.inputs[1]].nbytes or 0)


def rewrite_bytes(rewritten: Iterable[tuple[int, int]]) -> int:
    """What creating a session adds while it rewrites its convolutions: for each (weight
    bytes, :func:`relayout_bytes`) of them, the copies, plus the largest weight twice."""
    pairs = list(rewritten)
    return sum(copies for _, copies in pairs) + 2 * max((size for size, _ in pairs), default=0)


def session_bookkeeping_bytes(nodes: int, relaid: bool = False) -> int:
    """What a live session of ``nodes`` nodes holds besides its weights; ``relaid``: built
    through onnxruntime's optimizer beforehand and loaded mapped (a relaid segment or tile)."""
    return (RELAID_SESSION_OVERHEAD_BYTES if relaid else SESSION_OVERHEAD_BYTES) + SESSION_NODE_BYTES * nodes


# Workspace, measured on one node per session, arena off, pre-packing off (VmHWM while
# running minus RSS before, minus the output; onnxruntime 1.32, 2 threads):
#
#   Conv 3x3, 64->64 ch, 256x256, weight an initializer   input 16 + output 16 MiB -> +31.9 MiB
#   the same Conv, weight fed as a graph input                                      -> +0.1 MiB
#   Conv 1x1, 256->64 ch, 56x56, initializer / fed          in 3.1, out 0.8 MiB      -> +3.1 / +0.0 MiB
#   MaxPool 2x2, 64 ch, 256x256                             in 16, out 4 MiB         -> +20.0 MiB
#   ConvTranspose 2x2 stride 2, 128->64 ch, 64x64, fed      out 4 MiB                -> +4.0 MiB
#   Relu, 16 MiB                                                                     -> +0.0 MiB
#
#   Conv 3x3, 1024->1024 ch, 16x16 (UNet's deepest), fed          im2col 9 MiB           -> +9 MiB
#
# With a constant weight, onnxruntime's NCHWc layout transformer runs the Conv on blocked
# copies of its input and output (ReorderInput / ReorderOutput around it); it does the
# same for pools, which need no weight. A Conv whose weight is fed cannot be transformed
# (its weight is not known when the session is built) and runs as MLAS's im2col and GEMM,
# whose working buffer MlasConvPrepare (mlas/lib/convolve.cpp) sizes: none for a pointwise
# Conv without stride or padding; the whole expanded input (output pixels x input channels
# per group x kernel) when there are more filters than output pixels, or a batch or groups
# (one per thread, at most one per image and group); else a few panels per thread.
# ConvTranspose's column buffer holds (out channels / group) x kernel x input pixels.
_NCHWC_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})


def workspace_bytes(graph: Graph, node: NodeInfo, *, weights_fed: bool) -> int:
    """Bytes ``node``'s kernel allocates while it runs, beyond its inputs and outputs.

    ``weights_fed``: the node's session is handed its large weights as inputs
    (``prepack_weights=False``) rather than holding them as initializers.
    """
    if not node.is_default_domain or not node.inputs:
        return 0
    first = graph.tensors.get(node.inputs[0])
    if first is None or first.dtype != "float32" or first.shape is None or len(first.shape) != 4:
        return 0
    io = (first.nbytes or 0) + sum(graph.tensors[t].nbytes or 0 for t in node.outputs[:1])
    if node.op_type in _NCHWC_POOLS:
        return io
    if node.op_type == "Conv" and len(node.inputs) > 1:
        weight = graph.tensors[node.inputs[1]]
        fed = weights_fed and graph.is_weight(weight.name) and (weight.nbytes or 0) > SMALL_TENSOR_BYTES
        return _im2col_bytes(graph, node) if fed else io
    if node.op_type == "ConvTranspose" and len(node.inputs) > 1:
        weight = graph.tensors[node.inputs[1]]   # (in channels, out channels / group, kh, kw)
        dims = (*first.shape, *(weight.shape or ()))
        if weight.shape is None or len(weight.shape) != 4 or not all(isinstance(d, int) for d in dims):
            return 0
        return 4 * int(np.prod(weight.shape[1:])) * int(first.shape[2]) * int(first.shape[3])
    return 0


def _im2col_bytes(graph: Graph, node: NodeInfo) -> int:
    """MLAS's working buffer for a float32 2-D Conv run without NCHWc (its weight fed)."""
    weight, output = graph.tensors[node.inputs[1]].shape, graph.tensors[node.outputs[0]].shape
    if weight is None or output is None or len(weight) != 4 or len(output) != 4 \
            or not all(isinstance(d, int) for d in (*weight, *output)):
        return 0
    batch, filters, pixels = output[0], output[1], output[2] * output[3]
    groups = node.int_attribute("group", 1)
    expanded = pixels * weight[1] * weight[2] * weight[3]          # output pixels x K
    pointwise = weight[2] == weight[3] == 1 and not any(node.ints_attribute("pads") or ()) \
        and all(s == 1 for s in node.ints_attribute("strides") or ())
    if pointwise:
        return 0
    if batch > 1 or groups > 1:
        # One buffer per thread, at most one per image and group: counted for every thread,
        # so that from two images on the count does not depend on the batch (the streaming
        # planner reads chunk sizes off a line in the batch).
        return 4 * (os.cpu_count() or 1) * max(expanded, filters // groups * pixels)
    return 4 * expanded if filters > pixels else 0
