"""Executes a schedule segment by segment with onnxruntime.

The runtime only reads the schedule: which nodes form each segment, what each
segment reads and returns, which tensors are marked unneeded after which step,
which weights are resident when. Inside a segment onnxruntime frees tensors at
their last use; between segments Hyperion drops every tensor whose ``frees``
step has run, so nothing outlives the step liveness names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from onnx import NodeProto, TypeProto

from hyperion.errors import FeedError, RuntimeExecutionError, UnsupportedModelError
from hyperion.onnx_import import ModelSource
from hyperion.schedule import Schedule, Segment
from hyperion.segment_model import build_segment_model, nodes_by_name
from hyperion.weights import WeightStore

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """What the last run did: accounted peak bytes, time per segment, mode."""

    mode: str = ""
    peak_bytes: int = 0           # accounted: the plan's peak, checked against the arrays actually held
    held_peak_bytes: int = 0      # measured: bytes of arrays Hyperion held between segments
    segment_ms: list[float] = field(default_factory=list)
    total_ms: float = 0.0

    @property
    def step_ms(self) -> list[float]:
        """Per-step time; equals ``segment_ms`` when every segment is one step."""
        return self.segment_ms


@dataclass(frozen=True)
class SessionConfig:
    intra_op_num_threads: int = 0
    enable_cpu_mem_arena: bool = True
    # False: build segment models even when one normal-mode segment could hand
    # onnxruntime the user's model untouched (exercises the segment plumbing).
    whole_model_shortcut: bool = True


class Runtime:
    """Runs one schedule. Sessions are kept for the next run in ``normal`` mode;
    in ``memory_opt`` mode a segment's session (and with it its weights) lives
    only while the segment runs."""

    def __init__(self, source: ModelSource, schedule: Schedule, value_types: Mapping[str, TypeProto],
                 config: SessionConfig | None = None) -> None:
        self.source = source
        self.schedule = schedule
        self.value_types = value_types
        self.config = config or SessionConfig()
        self.weights = WeightStore(source, schedule.tensors)
        self._sessions: dict[int, ort.InferenceSession] = {}
        self._node_protos: dict[str, NodeProto] | None = None
        self.stats = RunStats(mode=schedule.mode)

    @property
    def keeps_sessions(self) -> bool:
        return self.schedule.mode == "normal"

    # -- sessions -----------------------------------------------------------------------
    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = self.config.intra_op_num_threads
        options.enable_cpu_mem_arena = self.config.enable_cpu_mem_arena
        # Relative external-data locations resolve against the model's folder.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(self.source.base_dir))
        return options

    def _whole_model(self) -> bool:
        """One segment in normal mode: hand onnxruntime the user's model untouched."""
        return (self.config.whole_model_shortcut and len(self.schedule.segments) == 1
                and self.schedule.mode == "normal")

    def session(self, segment: Segment) -> ort.InferenceSession:
        if segment.index in self._sessions:
            return self._sessions[segment.index]
        if self._whole_model():
            model = str(self.source.path) if self.source.path else self.source.proto.SerializeToString()
        else:
            model = build_segment_model(self.source, self.schedule, segment, self.value_types,
                                        self._nodes(), self.weights.protos).SerializeToString()
        try:
            session = ort.InferenceSession(model, self._options(), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            first = self.schedule.steps[segment.first_step]
            raise UnsupportedModelError(
                f"{self.source.label}: onnxruntime cannot load segment {segment.index} "
                f"(steps {segment.first_step}-{segment.last_step}, from node {first.node!r}): "
                f"{_first_line(exc)}") from None
        if self.keeps_sessions:
            self._sessions[segment.index] = session
        return session

    def _nodes(self) -> dict[str, NodeProto]:
        if self._node_protos is None:
            self._node_protos = nodes_by_name(self.source)
        return self._node_protos

    # -- running ------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(self.check_feeds(feeds))
        stats = RunStats(mode=self.schedule.mode)
        started = time.perf_counter()
        for segment in self.schedule.segments:
            t0 = time.perf_counter()
            outputs = self._run_segment(segment, {name: env[name] for name in segment.inputs})
            env.update(zip(segment.outputs, outputs))
            del outputs
            held = sum(a.nbytes for a in env.values() if isinstance(a, np.ndarray))
            stats.held_peak_bytes = max(stats.held_peak_bytes, held)
            for step in segment.steps:
                for name in self.schedule.steps[step].frees:
                    env.pop(name, None)
            stats.segment_ms.append(1e3 * (time.perf_counter() - t0))
        stats.total_ms = 1e3 * (time.perf_counter() - started)
        stats.peak_bytes = max(self.schedule.peak_bytes, stats.held_peak_bytes)
        self.stats = stats
        return {name: env[name] if name in env else self.weights.read(name)
                for name in self.schedule.graph_outputs}

    def _run_segment(self, segment: Segment, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self.session(segment)
        try:
            return session.run(list(segment.outputs), feeds)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeExecutionError(
                f"{self.source.label}: onnxruntime failed in segment {segment.index} "
                f"(steps {segment.first_step}-{segment.last_step}): {_first_line(exc)}") from None

    # -- feeds --------------------------------------------------------------------------
    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = self.schedule.graph_inputs
        unknown = [n for n in feeds if n not in expected and
                   (n not in self.schedule.tensors or self.schedule.tensors[n].role != "weight")]
        if unknown:
            raise FeedError(f"{self.source.label}: no input named {unknown[0]!r}; inputs are {list(expected)}")
        missing = [n for n in expected if n not in feeds]
        if missing:
            raise FeedError(f"{self.source.label}: missing input {missing[0]!r}")
        checked: dict[str, np.ndarray] = {}
        for name in expected:
            checked[name] = check_feed(name, feeds[name], self.schedule)
        return checked


def check_feed(name: str, value: object, schedule: Schedule) -> np.ndarray:
    record = schedule.tensors[name]
    if not isinstance(value, np.ndarray):
        if record.dtype in ("sequence", "optional", "map") or value is None:
            return value  # onnxruntime checks non-tensor values itself
        value = np.asarray(value)
    if record.dtype not in ("unknown",) and value.dtype != np.dtype(record.dtype) \
            and record.dtype in np.sctypeDict:
        raise FeedError(f"input {name!r}: expected dtype {record.dtype}, got {value.dtype}")
    shape = schedule.input_shapes.get(name)
    if shape is not None:
        if len(shape) != value.ndim or any(isinstance(d, int) and d != v for d, v in zip(shape, value.shape)):
            raise FeedError(f"input {name!r}: expected shape {list(shape)}, got {list(value.shape)}")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
