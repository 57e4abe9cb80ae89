"""memory.ort_arena: the footprint of onnxruntime's arena a plan's runs keep (rule 14 of segment),
on a model of its BFC arena -- best fit, coalescing, regions doubling from 1 MiB -- checked
against the arena itself where the figure is observable."""

from __future__ import annotations

from hyperion.passes.memory.ort_arena import (
    Alloc,
    Free,
    SegmentEnd,
    arena_footprint,
    idle_bytes_at_segments,
)
from tests.conftest import run_python

MIB = 2**20


def test_a_block_freed_is_reused_by_the_next_run_and_the_arena_does_not_grow() -> None:
    run = [Alloc("a", MIB // 2), Alloc("b", MIB // 2), Free("a"), Free("b")]
    assert arena_footprint(run, runs=1) == MIB
    assert arena_footprint(run, runs=3) == MIB


def test_freed_neighbours_merge_so_a_wider_block_fits_where_two_narrow_ones_were() -> None:
    # DenseNet's concatenations: each output wider than any block freed before it. Freed
    # neighbours merge, so the third block takes the first two's place in the first region.
    run = [Alloc("a", MIB // 4), Alloc("b", MIB // 4), Free("a"), Free("b"), Alloc("c", MIB // 2), Free("c")]
    assert arena_footprint(run, runs=1) == MIB // 2


def test_a_request_no_free_chunk_holds_opens_a_region_twice_the_size_of_the_last() -> None:
    # 1 MiB first, then 2 MiB: a live 768 KiB block leaves 256 KiB of the first region, so a
    # second 768 KiB block opens a region of its own; only the pages written count.
    run = [Alloc("a", 3 * MIB // 4), Alloc("b", 3 * MIB // 4), Free("a"), Free("b")]
    assert arena_footprint(run, runs=1) == 3 * MIB // 2
    # A block bigger than the next region's size opens a region of the next power of two.
    assert arena_footprint([Alloc("big", 5 * MIB), Free("big")], runs=1) == 5 * MIB


def test_a_graph_output_the_caller_holds_is_freed_after_the_next_run_allocated_its_own() -> None:
    run = [Alloc("y", MIB // 2)]     # handed to the caller: never freed within the run
    assert arena_footprint(run, runs=1) == MIB // 2
    assert arena_footprint(run, runs=2) == MIB      # both runs' outputs exist at once
    assert arena_footprint(run, runs=3) == MIB      # the first one's place is reused


def test_a_run_that_builds_shrinks_the_arena_after_every_segment_but_its_first_region() -> None:
    # Segment 0 writes all of the first region and a 2 MiB one; only y (the first region's
    # first half) lives on: the 2 MiB region is given back, and segment 1's session is created
    # beside the first region's other half, written and idle.
    run = [Alloc("y", MIB // 2), Alloc("t", MIB // 2), Alloc("u", 2 * MIB), Free("t"), Free("u"), SegmentEnd(),
           Alloc("z", MIB // 4), Free("y"), Free("z"), SegmentEnd()]
    assert idle_bytes_at_segments(run) == [0, MIB // 2]
    assert arena_footprint(run, runs=1) == 3 * MIB   # a run that builds nothing keeps every region


ARENA_RUN = """
import re, sys
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
from hyperion.runtime.sessions import session_options

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

elements = int(sys.argv[1])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [elements])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
session = ort.InferenceSession(model.SerializeToString(), session_options(threads=1, arena=False, shared_arena=True),
                               providers=["CPUExecutionProvider"])
x = np.ones(elements, np.float32)
before = rss()
del session.run(None, {"x": x})[0]
after_one = rss()
del session.run(None, {"x": x})[0]
print(after_one - before, rss() - after_one)
"""


def test_the_shared_arena_keeps_the_pages_the_model_counts_and_a_second_run_adds_none() -> None:
    # A session on the shared arena makes r and y (n floats each; y handed out, then dropped),
    # in fresh processes for two sizes: what the first run leaves resident grows with the size
    # as the model's footprint does (the difference cancels the run's own fixed state), and the
    # next run, reusing the arena's pages, adds none.
    def modelled(nbytes: int) -> int:
        return arena_footprint([Alloc("r", nbytes), Alloc("y", nbytes), Free("r"), Free("y")], runs=1)

    measured = {}
    for elements in (MIB, 2 * MIB):
        first, second = (int(v) for v in run_python(ARENA_RUN, str(elements)).split())
        assert first >= modelled(4 * elements) - MIB     # the pages stay after the run
        assert abs(second) < MIB                          # and the next run reuses them
        measured[elements] = first
    assert modelled(8 * MIB) - modelled(4 * MIB) == 8 * MIB
    assert abs((measured[2 * MIB] - measured[MIB]) - 8 * MIB) < MIB
