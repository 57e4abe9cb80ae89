"""The planner: runs the pass pipeline for a mode and emits a :class:`~hyperion.schedule.Schedule`.

``plan`` picks the mode (adaptive: the fastest whose plan fits the cap),
``streaming`` sizes batch chunks, ``emit`` turns the analyses into the schedule.
"""

from __future__ import annotations

from hyperion.planner.plan import optimal_batch_size, parse_mode, plan, run_passes

__all__ = ["optimal_batch_size", "parse_mode", "plan", "run_passes"]
