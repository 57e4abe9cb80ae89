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
        self._whole_model_ms: float | None = None
        self.stats = RunStats(mode=schedule.mode)
        # Per segment, every tensor a step of it marks unneeded: dropped once the segment returns.
        self._frees_after_segment = [tuple(t for i in seg.steps for t in schedule.steps[i].frees)
                                     for seg in schedule.segments]
        self._expected_feeds = {name: _expected_feed(name, schedule) for name in schedule.graph_inputs}
        self._output_names = list(schedule.graph_outputs)
        self._is_whole_model = self._whole_model()

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
        if self._is_whole_model:
            # The fast path: onnxruntime checks the feeds itself; Hyperion only explains a failure.
            session = self._sessions.get(0) or self.session(self.schedule.segments[0])
            started = time.perf_counter()
            try:
                outputs = session.run(self._output_names, feeds)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                self.check_feeds(feeds)  # a bad feed becomes a FeedError naming the input
                raise RuntimeExecutionError(f"{self.source.label}: onnxruntime failed: "
                                            f"{_first_line(exc)}") from None
            self._whole_model_ms = 1e3 * (time.perf_counter() - started)
            return dict(zip(self._output_names, outputs))
        env = self.check_feeds(feeds)
        segment_ms: list[float] = []
        held_peak = 0
        started = time.perf_counter()
        for segment, frees in zip(self.schedule.segments, self._frees_after_segment):
            t0 = time.perf_counter()
            outputs = self._run_segment(segment, {name: env[name] for name in segment.inputs})
            env.update(zip(segment.outputs, outputs))
            del outputs
            held_peak = max(held_peak, sum(a.nbytes for a in env.values() if isinstance(a, np.ndarray)))
            for name in frees:
                env.pop(name, None)
            segment_ms.append(1e3 * (time.perf_counter() - t0))
        self.stats = RunStats(self.schedule.mode, max(self.schedule.peak_bytes, held_peak), held_peak,
                              segment_ms, 1e3 * (time.perf_counter() - started))
        return {name: env[name] if name in env else self.weights.read(name)
                for name in self.schedule.graph_outputs}

    @property
    def stats(self) -> RunStats:
        if self._whole_model_ms is not None:  # built on demand: nothing extra on the fast path
            ms = self._whole_model_ms
            return RunStats(self.schedule.mode, self.schedule.peak_bytes, 0, [ms], ms)
        return self._stats

    @stats.setter
    def stats(self, value: RunStats) -> None:
        self._stats = value
        self._whole_model_ms = None

    def run_segment(self, segment: Segment, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one segment on its inputs (``segment.inputs`` by name); its outputs by name.

        The building block for stepping through a schedule one segment at a time, as
        the seed API's ``ForwardScheduler`` does with one step per segment.
        """
        return dict(zip(segment.outputs, self._run_segment(segment, dict(feeds))))

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
        """The feeds by input name, after checking names, dtypes and shapes."""
        checked: dict[str, np.ndarray] = {}
        for name, (dtype, shape) in self._expected_feeds.items():
            if name not in feeds:
                raise FeedError(f"{self.source.label}: missing input {name!r}")
            value = feeds[name]
            if dtype is not None:
                if not isinstance(value, np.ndarray):
                    value = np.asarray(value)
                if value.dtype != dtype:
                    raise FeedError(f"input {name!r}: expected dtype {dtype}, got {value.dtype}")
                if shape is not None and (len(shape) != value.ndim or any(
                        d is not None and d != v for d, v in zip(shape, value.shape))):
                    raise FeedError(f"input {name!r}: expected shape {[d or '?' for d in shape]}, "
                                    f"got {list(value.shape)}")
            checked[name] = value
        if len(feeds) > len(checked):
            unknown = [n for n in feeds if n not in checked and not self._is_weight(n)]
            if unknown:
                raise FeedError(f"{self.source.label}: no input named {unknown[0]!r}; "
                                f"inputs are {list(self._expected_feeds)}")
        return checked

    def _is_weight(self, name: str) -> bool:
        record = self.schedule.tensors.get(name)
        return record is not None and record.role == "weight"


def _expected_feed(name: str, schedule: Schedule) -> tuple[np.dtype | None, tuple[int | None, ...] | None]:
    """(dtype, shape with None for free dims) of an input; dtype None for non-tensor inputs."""
    record = schedule.tensors[name]
    if record.dtype not in np.sctypeDict:
        return None, None  # sequences, optionals, maps: onnxruntime checks them itself
    shape = schedule.input_shapes.get(name)
    return np.dtype(record.dtype), None if shape is None else tuple(d if isinstance(d, int) else None
                                                                    for d in shape)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
