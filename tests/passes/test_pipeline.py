"""pipeline: the pass list of each mode, the stages, and the manager's checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from hyperion.errors import PassError
from hyperion.ir import ExecutionMode
from hyperion.passes import PassResult, Program
from hyperion.passes.liveness import LivenessPass
from hyperion.passes.ordering.order import OrderPass
from hyperion.passes.pipeline import SegmentOptions, Stage, build_pipeline
from tests.passes.helpers import program_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
CHAIN = f"""{HEADER}
g (float[4, 8] x) => (float[4, 8] y) {{
    a = Relu(x)
    b = Neg(a)
    y = Add(a, b)
}}"""
PLAN = ["classify_edges", "order", "tile", "liveness", "plan_memory", "segment"]


@pytest.mark.parametrize("mode", [ExecutionMode.NORMAL, ExecutionMode.MEMORY_OPT])
def test_normal_and_memory_opt_run_every_pass_but_batch_separable(mode: ExecutionMode) -> None:
    assert list(build_pipeline(mode).names) == PLAN


def test_streaming_checks_the_batch_after_the_order() -> None:
    assert list(build_pipeline(ExecutionMode.STREAMING).names) == \
        ["classify_edges", "order", "batch_separable", "tile", "liveness", "plan_memory", "segment"]


def test_stages_select_the_passes_and_options_reach_the_segment_pass() -> None:
    pipeline = build_pipeline(ExecutionMode.MEMORY_OPT, SegmentOptions(max_segment_steps=1, prefetch=False),
                              stages=(Stage.ORDER, Stage.PLAN), pinned_bytes=64)
    assert list(pipeline.names) == PLAN[1:]
    segment = pipeline.passes[-1]
    assert (segment.max_segment_steps, segment.prefetch, segment.pinned_bytes) == (1, False, 64)
    assert list(build_pipeline(ExecutionMode.NORMAL, stages=(Stage.BATCH,)).names) == []


def test_modified_means_the_ir_or_an_analysis_changed() -> None:
    program = program_from_text(CHAIN)
    assert build_pipeline(ExecutionMode.NORMAL)(program).modified
    assert not build_pipeline(ExecutionMode.NORMAL)(program).modified   # the same results again
    program.memory_limit = program.segmentation.peak_bytes if program.segmentation else None
    assert not build_pipeline(ExecutionMode.NORMAL, stages=(Stage.PLAN,))(program).modified
    program.mode = ExecutionMode.MEMORY_OPT
    assert build_pipeline(ExecutionMode.MEMORY_OPT, stages=(Stage.PLAN,))(program).modified


def test_a_pass_run_before_what_it_reads_names_what_is_missing() -> None:
    with pytest.raises(PassError, match="'liveness' needs an order"):
        LivenessPass()(program_from_text(CHAIN))


@dataclass(frozen=True)
class _BackwardsOrder(OrderPass):
    name: ClassVar[str] = "backwards_order"

    def call(self, program: Program) -> PassResult:
        program.order = tuple(reversed(program.graph.file_order()))
        return PassResult(program, True)


def test_a_pass_that_breaks_its_postcondition_is_named() -> None:
    with pytest.raises(PassError, match="'backwards_order' broke its postcondition: the order is not topological"):
        _BackwardsOrder()(program_from_text(CHAIN))
