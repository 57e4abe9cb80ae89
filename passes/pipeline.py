"""The one place that builds the pass list for a mode.

A compile runs the pipeline in stages, because the stages depend on different
things and the planner may try several modes on one graph:

* ``CLASSIFY`` -- edge kinds: the same in every mode, run once per compile;
* ``ORDER`` -- the order: depends on the planning mode only (``normal`` versus
  everything else, planned as ``memory_opt``), run once per planning mode;
* ``BATCH`` -- streaming only: can the batch be split along axis 0;
* ``PLAN`` -- steps read in part (tile), liveness, arena and segments: depend on the
  mode, the cap and the segment options, run for every plan tried.

Graphs built by hand (the seed API) come with their edge kinds and skip ``CLASSIFY``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import dataclass

from hyperion.ir import ExecutionMode
from hyperion.passes._infra import Pass, PassManager
from hyperion.passes.batch.separable import BatchSeparablePass
from hyperion.passes.classify_edges import ClassifyEdgesPass
from hyperion.passes.liveness import LivenessPass
from hyperion.passes.memory.plan_memory import PlanMemoryPass
from hyperion.passes.ordering.order import OrderPass
from hyperion.passes.segment import SegmentPass
from hyperion.passes.tile import TilePass


class Stage(enum.Enum):
    CLASSIFY = "classify"
    ORDER = "order"
    BATCH = "batch"
    PLAN = "plan"


ALL_STAGES = tuple(Stage)


@dataclass(frozen=True)
class SegmentOptions:
    """The segment pass's options, as ``compile`` takes them."""

    max_segment_steps: int | None = None
    prefetch: bool | None = None          # None: when weights are pre-packed
    weight_cache_bytes: int | None = None
    prepack_weights: bool | None = None   # None: in normal mode only
    relayout: bool = True                 # fed segments packed once by onnxruntime's optimizer, mapped
    keep_heap: bool = True                # runs may keep a shared arena for the next (segment rule 14)

    def for_mode(self, mode: ExecutionMode) -> SegmentOptions:
        """The options with ``None`` resolved for ``mode``. Weights are pre-packed where
        sessions persist anyway (normal mode: packed once, the fastest kernels) and fed
        where they stream (every other mode: sessions built once, each run handed the
        weights mapped from their file, so no run builds a session or packs a weight).
        Prefetch builds the next packed session during the current segment; fed weights
        need none."""
        prepack = self.prepack_weights if self.prepack_weights is not None else mode is ExecutionMode.NORMAL
        prefetch = self.prefetch if self.prefetch is not None else prepack
        return dataclasses.replace(self, prefetch=prefetch, prepack_weights=prepack)

    def segment_pass(self, pinned_bytes: int = 0) -> SegmentPass:
        assert self.prefetch is not None and self.prepack_weights is not None, "resolve with for_mode first"
        return SegmentPass(max_segment_steps=self.max_segment_steps, prefetch=self.prefetch,
                           weight_cache_bytes=self.weight_cache_bytes, pinned_bytes=pinned_bytes,
                           prepack_weights=self.prepack_weights, relayout=self.relayout,
                           keep_heap=self.keep_heap)


def build_pipeline(mode: ExecutionMode, options: SegmentOptions | None = None, *,
                   stages: Iterable[Stage] = ALL_STAGES, pinned_bytes: int = 0) -> PassManager:
    """The passes of ``stages`` for ``mode``, in pipeline order.

    ``BATCH`` only has a pass in streaming mode; ``pinned_bytes`` are held for the whole
    run outside the graph (streaming: the batch's inputs and outputs).
    """
    wanted = frozenset(stages)
    options = (options or SegmentOptions()).for_mode(mode)
    passes: list[Pass] = []
    if Stage.CLASSIFY in wanted:
        passes.append(ClassifyEdgesPass())
    if Stage.ORDER in wanted:
        passes.append(OrderPass())
    if Stage.BATCH in wanted and mode is ExecutionMode.STREAMING:
        passes.append(BatchSeparablePass())
    if Stage.PLAN in wanted:
        passes += [TilePass(options.prefetch, options.prepack_weights, options.relayout,
                            options.segment_pass(pinned_bytes)),
                   LivenessPass(), PlanMemoryPass(), options.segment_pass(pinned_bytes)]
    return PassManager(passes)
