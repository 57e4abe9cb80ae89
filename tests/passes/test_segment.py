"""segment: segment sizes under a cap, the session accounting (packing, creation,
prefetch, weight cache, pinned bytes), and the smallest limit it reports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hyperion.errors import MemoryLimitError
from hyperion.ir import ExecutionMode
from hyperion.passes import Program
from hyperion.passes.liveness import Liveness, compute_liveness
from hyperion.passes.memory.costs import packed_bytes, resident_bytes, session_bookkeeping_bytes
from hyperion.passes.segment import SegmentPass, segment
from tests.passes.helpers import program_from_model

ROW_BYTES = 64 * 4   # one activation row of the chains below
WEIGHT_BYTES = 64 * 64 * 4


def matmul_chain(layers: int = 3, cols: int = 64) -> onnx.ModelProto:
    """x[1,64] -> (MatMul w_i[64,cols] -> Relu) x layers, the last Relu dropped."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for i in range(layers):
        width = cols if i == layers - 1 else 64
        weights.append(numpy_helper.from_array(rng.standard_normal((64, width)).astype(np.float32), f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [out], name=f"mm{i}"))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            previous = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def segmented(model: onnx.ModelProto, mode: ExecutionMode, limit: int | None, **options: object) -> Program:
    program = program_from_model(model)
    program.mode, program.memory_limit = mode, limit
    program.order = program.graph.file_order()
    program.liveness = compute_liveness(program.graph, program.order)
    SegmentPass(**options)(program)  # type: ignore[arg-type]
    return program


def test_no_cap_is_one_segment_and_one_step_segments_on_request() -> None:
    assert len(segmented(matmul_chain(), ExecutionMode.NORMAL, None).segmentation.spans) == 1
    spans = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, max_segment_steps=1).segmentation.spans
    assert [(s.start, s.stop) for s in spans] == [(i, i + 1) for i in range(5)]


def test_packing_rounds_columns_up_to_sixteen() -> None:
    graph = program_from_model(matmul_chain(layers=2, cols=10)).graph
    assert packed_bytes(graph, "w0") == 64 * 64 * 4
    assert packed_bytes(graph, "w1") == 64 * 16 * 4          # 10 columns pack as 16
    assert resident_bytes(graph, "w1") == 64 * 16 * 4
    # Creating the session over both packs them beside the original of the larger one.
    one_segment = segmented(matmul_chain(layers=2, cols=10), ExecutionMode.MEMORY_OPT, None).segmentation
    assert one_segment.loading_bytes == (64 * 64 * 4 + 64 * 16 * 4 + 64 * 64 * 4,)


def test_a_weight_also_read_unpacked_counts_twice() -> None:
    model = matmul_chain(layers=1)
    model.graph.node.append(helper.make_node("Identity", ["w0"], ["w_copy"], name="copy"))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [64, 64]))
    graph = program_from_model(model).graph
    assert resident_bytes(graph, "w0") == 2 * WEIGHT_BYTES


def test_memory_opt_accounts_creation_prefetch_and_the_cyclic_prefetch() -> None:
    seg = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, max_segment_steps=1,
                    weight_cache_bytes=0).segmentation
    act = 2 * ROW_BYTES                         # every step reads one row and writes one
    held, loading = WEIGHT_BYTES, 2 * WEIGHT_BYTES
    assert seg.held_bytes == (held, 0, held, 0, held)
    assert seg.loading_bytes == (loading, 0, loading, 0, loading)
    assert seg.prefetch and seg.cyclic_prefetch and seg.cached == ()
    # Step 0 creates its own session; every step accounts the next segment's creation;
    # the last one prefetches segment 0 for the next run.
    assert seg.step_bytes == (act + loading, act + loading, act + held, act + loading, act + held + loading)


def test_without_prefetch_each_segment_pays_only_for_its_own_creation() -> None:
    seg = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, max_segment_steps=1, prefetch=False,
                    weight_cache_bytes=0).segmentation
    act, loading = 2 * ROW_BYTES, 2 * WEIGHT_BYTES
    assert not seg.prefetch and not seg.cyclic_prefetch
    assert seg.step_bytes == (act + loading, act, act + loading, act, act + loading)


def test_normal_mode_holds_every_weight_and_pays_creation_once_per_segment() -> None:
    seg = segmented(matmul_chain(), ExecutionMode.NORMAL, None, max_segment_steps=2).segmentation
    act, all_held = 2 * ROW_BYTES, 3 * WEIGHT_BYTES
    assert [(s.start, s.stop) for s in seg.spans] == [(0, 2), (2, 4), (4, 5)]
    assert seg.cached == (0, 1, 2)
    held_input = ROW_BYTES   # a segment holds its inputs until it returns
    assert seg.step_bytes == (act + all_held + WEIGHT_BYTES, act + held_input + all_held,
                              act + all_held + WEIGHT_BYTES, act + held_input + all_held,
                              act + all_held + WEIGHT_BYTES)


def test_segments_grow_while_the_double_buffer_fits() -> None:
    cap = 2 * ROW_BYTES + WEIGHT_BYTES + 2 * WEIGHT_BYTES    # a held segment plus the next one's creation
    seg = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, cap, weight_cache_bytes=0).segmentation
    assert seg.peak_bytes <= cap and 2 <= len(seg.spans) < 5
    # While a segment runs, the next one's session is being created: both fit.
    assert all(seg.held_bytes[i] + seg.loading_bytes[i + 1] <= cap for i in range(len(seg.spans) - 1))


def test_the_smallest_limit_reported_admits_a_plan_and_one_byte_less_does_not() -> None:
    with pytest.raises(MemoryLimitError) as info:
        segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, 1000)
    smallest = info.value.smallest_limit_bytes
    assert info.value.node == "mm0" and "prefetched" in str(info.value)
    assert segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, smallest).segmentation.peak_bytes <= smallest
    with pytest.raises(MemoryLimitError):
        segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, smallest - 1)


def test_the_weight_cache_keeps_what_fits_its_budget_and_the_cap() -> None:
    budget = WEIGHT_BYTES + session_bookkeeping_bytes(1)
    seg = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, max_segment_steps=1,
                    weight_cache_bytes=budget).segmentation
    assert seg.cached == (0,)                       # the first session that fits; the budget holds one
    everything = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, max_segment_steps=1).segmentation
    assert everything.cached == (0, 2, 4)           # no budget and no cap: every session with weights
    # Under a cap, caching never pushes a step over it.
    cap = 2 * ROW_BYTES + 3 * WEIGHT_BYTES + session_bookkeeping_bytes(1)
    capped = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, cap, max_segment_steps=1).segmentation
    assert capped.peak_bytes <= cap and len(capped.cached) < 3


def test_a_cached_session_counts_at_every_step_outside_its_own_segment() -> None:
    seg = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, max_segment_steps=1, prefetch=False,
                    weight_cache_bytes=WEIGHT_BYTES + session_bookkeeping_bytes(1)).segmentation
    act, loading, kept = 2 * ROW_BYTES, 2 * WEIGHT_BYTES, WEIGHT_BYTES + session_bookkeeping_bytes(1)
    assert seg.cached == (0,)
    assert seg.step_bytes == (act + loading, act + kept, act + loading + kept, act + kept, act + loading + kept)


def test_pinned_bytes_count_at_every_step_and_against_the_cap() -> None:
    plain = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, weight_cache_bytes=0).segmentation
    pinned = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, weight_cache_bytes=0,
                       pinned_bytes=1000).segmentation
    assert [b + 1000 for b in plain.step_bytes] == list(pinned.step_bytes)
    with pytest.raises(MemoryLimitError) as info:
        segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, 1000)
    smallest = info.value.smallest_limit_bytes
    with pytest.raises(MemoryLimitError):
        segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, smallest + 999, pinned_bytes=1000)
    assert segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, smallest + 1000,
                     pinned_bytes=1000).segmentation.peak_bytes <= smallest + 1000


def test_no_steps_no_segments() -> None:
    graph = program_from_model(matmul_chain()).graph
    empty = segment(graph, Liveness((), {}, {}, ()), ExecutionMode.MEMORY_OPT, 1)
    assert empty.spans == () and empty.peak_bytes == 0


def wide_then_narrow() -> onnx.ModelProto:
    """x[1,65536] -> Relu -> Slice [1,64] -> MatMul w[64,64]: the widest activations come
    first, the only weight after them."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    bounds = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("starts", [0]), ("ends", [64]), ("axes", [1]))]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["s"], name="slice"),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 65536])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w, *bounds])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_kept_arena_replaces_each_steps_activations_by_its_footprint() -> None:
    options = {"max_segment_steps": 1, "prefetch": False, "prepack_weights": False, "weight_cache_bytes": 0}
    returned = segmented(wide_then_narrow(), ExecutionMode.MEMORY_OPT, None, **options).segmentation
    assert returned.kept_heap_bytes == 0                   # without a cap no arena is kept
    wide = 65536 * 4
    assert returned.step_bytes[0] == 2 * wide              # x and its Relu, at step 0: the high-water
    kept = segmented(wide_then_narrow(), ExecutionMode.MEMORY_OPT, 10 * wide, **options).segmentation
    # The arena's footprint over two runs: the Relu's pages, reused by the second run, and the
    # small Slice and MatMul outputs beside them -- less than two Relus.
    arena = kept.kept_heap_bytes
    assert wide < arena < 2 * wide and kept.spans == returned.spans
    # It stands in for each step's own activations, not beside them; x is the caller's, outside
    # the arena, while it is read.
    relu_step = returned.step_bytes[0] - 2 * wide           # x and r: no workspace
    slice_step = returned.step_bytes[1] - (wide + 256)      # r (held) and its slice s
    assert kept.step_bytes[:2] == (relu_step + arena + wide, slice_step + arena)
    assert kept.step_bytes[2] <= returned.step_bytes[2] + arena - 2 * 256   # s (held) and y replaced too
    # One step a segment already: no smaller segments to make room for it, so the arena goes back.
    tight = segmented(wide_then_narrow(), ExecutionMode.MEMORY_OPT, kept.peak_bytes - 1, **options).segmentation
    assert tight.kept_heap_bytes == 0 and tight.step_bytes == returned.step_bytes


def widening_chain(layers: int = 4, width: int = 16384) -> onnx.ModelProto:
    """x[1,width] -> (Relu -> Concat with x -> Mul by a weight) x layers: every output wider
    than the one before, as DenseNet's concatenations are, and a weight per layer."""
    nodes, weights, previous, wide = [], [], "x", width
    for i in range(layers):
        wide += width
        nodes += [helper.make_node("Relu", [previous], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Concat", [f"r{i}", "x"], [f"c{i}"], name=f"concat{i}", axis=1)]
        weights.append(numpy_helper.from_array(np.ones((1, wide), np.float32), f"s{i}"))
        previous = "y" if i == layers - 1 else f"m{i}"
        nodes.append(helper.make_node("Mul", [f"c{i}", f"s{i}"], [previous], name=f"mul{i}"))
    graph = helper.make_graph(nodes, "widening", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, wide])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


WIDENING = {"prefetch": False, "prepack_weights": False, "weight_cache_bytes": 0}


def test_the_arena_is_counted_in_place_of_activations_not_beside_them() -> None:
    plain = segmented(widening_chain(), ExecutionMode.MEMORY_OPT, None, **WIDENING).segmentation
    roomy = segmented(widening_chain(), ExecutionMode.MEMORY_OPT, 100 * plain.peak_bytes, **WIDENING).segmentation
    assert roomy.spans == plain.spans and roomy.kept_heap_bytes > 0
    assert 0 < roomy.peak_bytes - plain.peak_bytes < roomy.kept_heap_bytes


def test_segments_are_grown_smaller_to_make_room_for_the_kept_arena() -> None:
    model = widening_chain(layers=6)
    plain = segmented(model, ExecutionMode.MEMORY_OPT, None, **WIDENING).segmentation
    roomy = segmented(model, ExecutionMode.MEMORY_OPT, 100 * plain.peak_bytes, **WIDENING).segmentation
    # Just under what one segment needs with the arena kept: two segments, each holding fewer
    # weights beside it, keep it; the plan without it stays one segment.
    cap = roomy.peak_bytes * 99 // 100
    kept = segmented(model, ExecutionMode.MEMORY_OPT, cap, **WIDENING).segmentation
    assert kept.kept_heap_bytes > 0 and len(kept.spans) > len(roomy.spans) and kept.peak_bytes <= cap
    assert len(segmented(model, ExecutionMode.MEMORY_OPT, cap, keep_heap=False, **WIDENING).segmentation.spans) == 1


def test_a_plan_the_kept_arena_does_not_fit_keeps_none() -> None:
    model = widening_chain(layers=6)
    plain = segmented(model, ExecutionMode.MEMORY_OPT, None, **WIDENING).segmentation
    # The plan without the arena just fits: neither one segment nor smaller ones do with it.
    tight = segmented(model, ExecutionMode.MEMORY_OPT, plain.peak_bytes, **WIDENING).segmentation
    assert tight.kept_heap_bytes == 0 and tight.step_bytes == plain.step_bytes
