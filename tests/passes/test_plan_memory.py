"""plan_memory: overlapping lifetimes never share bytes; the arena stays near its floor."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.irregular import random_ir_dag
from hyperion.errors import PassError
from hyperion.ir import ExecutionMode, Graph
from hyperion.passes.liveness import Interval, compute_liveness
from hyperion.passes.memory.arena import best_placement, greedy_by_size, live_peak
from hyperion.passes.memory.plan_memory import PlanMemoryPass, arena_tensors, plan_memory
from hyperion.passes.ordering.order import plan_order
from tests.conftest import FIXTURE_NAMES, fixture_path
from tests.passes.helpers import program_from_model

MODES = (ExecutionMode.NORMAL, ExecutionMode.MEMORY_OPT)


def _overlaps(a: Interval, b: Interval) -> bool:
    return a.first <= b.last and b.first <= a.last


def _assert_disjoint(offsets: dict[str, int], intervals: dict[str, Interval], sizes: dict[str, int]) -> None:
    names = sorted(offsets)
    for i, a in enumerate(names):
        assert offsets[a] >= 0
        for b in names[i + 1:]:
            if _overlaps(intervals[a], intervals[b]):
                apart = offsets[a] + sizes[a] <= offsets[b] or offsets[b] + sizes[b] <= offsets[a]
                assert apart, f"{a} and {b} are live together and share arena bytes"


# -- hand-built -------------------------------------------------------------------------------------
def test_best_fit_reuses_the_smallest_gap_that_holds_a_tensor() -> None:
    intervals = {"big": Interval(0, 1), "mid": Interval(2, 3), "small": Interval(2, 3),
                 "late": Interval(4, 5), "long": Interval(0, 5)}
    sizes = {"big": 100, "mid": 60, "small": 30, "late": 100, "long": 10}
    offsets = greedy_by_size(intervals, sizes)
    # Largest first: big and late take [0, 100) (disjoint lifetimes); mid and small fit in the
    # hole big leaves at steps 2-3; long (the smallest) goes above them all.
    assert offsets == {"big": 0, "late": 0, "mid": 0, "small": 60, "long": 100}
    assert live_peak(intervals, sizes, 6) == 110


def test_a_tensor_goes_into_the_tightest_hole() -> None:
    intervals = {"a": Interval(0, 2), "b": Interval(0, 2), "c": Interval(0, 2), "d": Interval(0, 0),
                 "e": Interval(0, 0), "x": Interval(1, 2)}
    sizes = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10, "x": 20}
    offsets = greedy_by_size(intervals, sizes)
    # Step 0 stacks a b c d e = [0,50) [50,90) [90,120) [120,140) [140,150). x lives at
    # steps 1-2 only, where d's and e's bytes are free: the hole [120, ∞) holds it at 120.
    assert offsets["x"] == 120
    _assert_disjoint(offsets, intervals, sizes)


def test_the_floor_stops_the_search_and_an_empty_plan_is_empty() -> None:
    intervals = {"a": Interval(0, 1), "b": Interval(2, 3)}
    sizes = {"a": 8, "b": 8}
    strategy, offsets, arena = best_placement(intervals, sizes, floor=8)
    assert (strategy, arena) == ("largest_first", 8)
    assert best_placement({}, {}, floor=0) == ("largest_first", {}, 0)


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_arenas_are_within_5_percent_of_the_live_peak(name: str) -> None:
    program = program_from_model(str(fixture_path(name)))
    for mode in MODES:
        result = plan_order(program.graph, mode)
        liveness = compute_liveness(program.graph, result.order)
        plan = plan_memory(program.graph, liveness, mode)
        intervals, sizes = arena_tensors(program.graph, liveness)
        _assert_disjoint(dict(plan.offsets), intervals, sizes)
        assert plan.live_peak_bytes <= plan.arena_bytes <= 1.05 * plan.live_peak_bytes
        assert plan.lower_bound_bytes <= plan.peak_bytes


def test_the_pass_requires_liveness_and_stores_the_plan() -> None:
    program = program_from_model(str(fixture_path("unet")))
    with pytest.raises(PassError, match="liveness"):
        PlanMemoryPass()(program)
    program.liveness = compute_liveness(program.graph, program.graph.file_order())
    PlanMemoryPass()(program)
    assert program.memory_plan.arena_bytes >= program.memory_plan.live_peak_bytes > 0


# -- properties on random DAGs ------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), n_nodes=st.integers(1, 40), mode=st.sampled_from(MODES))
def test_overlapping_lifetimes_never_share_memory(seed: int, n_nodes: int, mode: ExecutionMode) -> None:
    graph: Graph = random_ir_dag(seed, n_nodes)
    liveness = compute_liveness(graph, plan_order(graph, mode).order)
    plan = plan_memory(graph, liveness, mode)
    intervals, sizes = arena_tensors(graph, liveness)
    assert set(plan.offsets) == set(intervals)
    _assert_disjoint(dict(plan.offsets), intervals, sizes)
    per_step = [sum(sizes[t] for t, iv in intervals.items() if max(iv.first, 0) <= s <= iv.last)
                for s in range(liveness.num_steps)]
    assert plan.live_peak_bytes == max(per_step, default=0)
    assert plan.arena_bytes >= plan.live_peak_bytes
    assert plan.arena_bytes == max((plan.offsets[t] + sizes[t] for t in intervals), default=0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(lifetimes=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 8), st.integers(1, 64)),
                          min_size=1, max_size=60))
def test_every_placement_order_keeps_lifetimes_apart(lifetimes: list[tuple[int, int, int]]) -> None:
    intervals = {f"t{i}": Interval(first, first + length) for i, (first, length, _) in enumerate(lifetimes)}
    sizes = {f"t{i}": size for i, (_, _, size) in enumerate(lifetimes)}
    floor = live_peak(intervals, sizes, 40)
    _, offsets, arena = best_placement(intervals, sizes, floor)
    _assert_disjoint(offsets, intervals, sizes)
    assert floor <= arena
