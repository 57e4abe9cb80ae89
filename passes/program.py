"""What the passes work on: the graph, the options, and each pass's typed result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hyperion.ir import ExecutionMode, Graph

if TYPE_CHECKING:  # the result types import the pass infrastructure, which imports this module
    from hyperion.passes.batch.separable import BatchSeparability
    from hyperion.passes.liveness import Liveness
    from hyperion.passes.memory.plan_memory import MemoryPlan
    from hyperion.passes.ordering.order import OrderResult
    from hyperion.passes.segment import Segmentation
    from hyperion.passes.tile import Tiling


@dataclass
class Program:
    """The graph, the mode and cap it is planned for, and the analyses so far.

    Each analysis field is written by one pass (named beside it); None until that
    pass ran. The graph itself is changed by ``classify_edges`` (edge kinds) and ``tile``
    (the accounted size of weights read in part).
    """

    graph: Graph
    mode: ExecutionMode = ExecutionMode.NORMAL
    memory_limit: int | None = None
    order: tuple[str, ...] | None = None                    # order: the steps, in the order they run
    order_result: OrderResult | None = None                 # order: peak, proven optimum, winner
    tiling: Tiling | None = None                            # tile: steps that read part of a weight
    liveness: Liveness | None = None                        # liveness
    memory_plan: MemoryPlan | None = None                   # plan_memory
    segmentation: Segmentation | None = None                # segment
    batch_separability: BatchSeparability | None = None     # batch_separable (streaming)
    batch_chunk: int | None = None      # streaming: samples per chunk this plan is for
    prefetch_dropped: bool = False      # the planner turned prefetch off for the plan to fit

    @property
    def planning_mode(self) -> ExecutionMode:
        return self.mode.planning_mode
