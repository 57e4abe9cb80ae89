"""The runtime: executes a :class:`~hyperion.schedule.Schedule` with onnxruntime.

It reads the schedule and decides nothing: ``executor`` runs segments and
drops tensors where liveness says, ``sessions`` keeps or prefetches the
segments' onnxruntime sessions (and holds the one recipe of session options,
:func:`session_options`), ``segment_model`` cuts a segment out of the user's
model, ``weights`` reads weights as arrays. It needs the user's model (its
nodes and weights) and the schedule, nothing else: no graph, no shape inference.
"""

from __future__ import annotations

from hyperion.runtime.executor import RunStats, Runtime, SessionConfig
from hyperion.runtime.sessions import session_options

__all__ = ["RunStats", "Runtime", "SessionConfig", "session_options"]
