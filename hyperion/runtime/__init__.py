"""The runtime: executes a :class:`~hyperion.schedule.Schedule` with onnxruntime.

It reads the schedule and decides nothing: ``executor`` runs segments and
drops tensors where liveness says, ``sessions`` keeps or prefetches the
segments' onnxruntime sessions, ``segment_model`` cuts a segment out of the
user's model, ``weights`` reads weights as arrays.
"""

from __future__ import annotations

from hyperion.runtime.executor import RunStats, Runtime, SessionConfig

__all__ = ["RunStats", "Runtime", "SessionConfig"]
