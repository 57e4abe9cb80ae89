"""Executes a schedule segment by segment with onnxruntime.

The runtime only reads the schedule: which nodes form each segment, what each
segment reads and returns, which tensors are marked unneeded after which step,
which weights are resident when. Inside a segment onnxruntime frees tensors at
their last use; between segments Hyperion drops every tensor whose ``frees``
step has run, so nothing outlives the step liveness names.

Weights live in the segments' sessions (:mod:`hyperion.runtime.sessions`) or
are fed to them: the schedule says which sessions are kept across runs
(``Segment.persistent``), which keep their weights (``Segment.cached``: the
weight cache), which weights are mapped and fed on every run
(``Segment.fed_weights``, :mod:`hyperion.runtime.weights`), and whether the next
segment is prefetched (its session built, or its fed weights read ahead). A schedule with a
``streaming`` record runs the batch in chunks and writes each chunk's outputs
into arrays for the whole batch. A ``whole_model`` schedule hands onnxruntime
the user's model untouched. Steps the schedule marks ``row_gather`` or ``tiles``
are segments of their own that the runtime runs itself (:mod:`hyperion.runtime.rows`,
:mod:`hyperion.runtime.tiles`), reading only the part of the weight they need; a
segment with a ``region`` runs its one session tile by tile (:mod:`hyperion.runtime.regions`). A
``relaid`` segment's session is built once through onnxruntime's optimizer and maps
the weights it re-laid and packed from the optimizer's file; their pages are dropped
after every run (:mod:`hyperion.runtime.relayout`, :mod:`hyperion.runtime.pages`). The
runtime reads these fields; it never looks at the mode to decide anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import NodeProto

from hyperion.digest import sha256
from hyperion.errors import FeedError, RuntimeExecutionError, UnsupportedModelError
from hyperion.frontend import ModelSource
from hyperion.ir import ExecutionMode, TensorRole
from hyperion.passes.memory.ort_arena import MAPPED_BLOCK_BYTES
from hyperion.runtime import pages
from hyperion.runtime.regions import region_model, run_region
from hyperion.runtime.relayout import cached_relaid, relaid_model, scratch_folder
from hyperion.runtime.rows import gather_rows
from hyperion.runtime.segment_model import build_segment_model, nodes_by_name
from hyperion.runtime.sessions import (
    SessionPool,
    SessionTimes,
    note_arena_kept,
    release_free_heap,
    return_freed_memory,
    session_options,
    shrink_shared_arena,
    shrinking_run_options,
)
from hyperion.runtime.tile_reads import TileMajorReader, WeightTileReader, tile_major_copy, write_tile_major
from hyperion.runtime.tiles import Staging, run_tiles, tile_in_file, tile_model
from hyperion.runtime.trace import HELD_COUNTER, NULL_RECORDER, NullRecorder
from hyperion.runtime.weights import FileSpan, WeightStore
from hyperion.schedule import RowGather, Schedule, Segment, Tiles

# With a cap, blocks of this size or more go back to the OS when freed (see sessions.return_freed_memory).
MMAP_THRESHOLD_BYTES = MAPPED_BLOCK_BYTES
# In a region's segment (tiles, patches) whose session is built every run, blocks of this size
# or more are mapped on their own and returned when freed. Its tiles allocate blocks of a
# tile's size, a few hundred KiB, which glibc would otherwise carve from the heap between
# the new session's own and leave as holes that grow run by run: the YOLO-style detector at
# a quarter of onnxruntime's RSS, whose stem runs in patches, crept from 50.8 to 54.3 MiB
# over ten runs; 47.4 MiB mapped, 10% slower. A kept session's tiles do not creep (whisper-
# tiny's attention: 0.5 MiB less mapped, 10% slower), so they stay on the heap.
REGION_MMAP_THRESHOLD_BYTES = 256 << 10
# Serialized segment models are kept for the next run up to this size: larger ones carry
# embedded weights, which must not stay resident outside the plan.
KEPT_SEGMENT_MODEL_BYTES = 64 * 1024

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """What the last run did: accounted peak bytes, time per segment, mode."""

    mode: ExecutionMode = ExecutionMode.NORMAL
    peak_bytes: int = 0           # accounted: the plan's peak, checked against the arrays actually held
    held_peak_bytes: int = 0      # measured: bytes of arrays Hyperion held between segments
    segment_ms: list[float] = field(default_factory=list)
    total_ms: float = 0.0
    chunks: int = 1               # streaming: chunks the batch ran in
    sessions: SessionTimes = field(default_factory=SessionTimes)
    fed_bytes: int = 0            # weight bytes handed to sessions from mapped files (no copy)

    @property
    def step_ms(self) -> list[float]:
        """Per-step time; equals ``segment_ms`` when every segment is one step."""
        return self.segment_ms


@dataclass(frozen=True)
class SessionConfig:
    """How this process runs a schedule; what runs is the schedule's alone."""

    intra_op_num_threads: int = 0
    enable_cpu_mem_arena: bool = True
    # With a cap: have glibc return large freed blocks to the OS, so RSS follows the plan.
    return_freed_memory: bool = False
    # False: run unpacked even a schedule planned packed (it then holds less than planned).
    prepack_weights: bool = True

    @classmethod
    def for_schedule(cls, schedule: Schedule, *, prepack_weights: bool = True) -> SessionConfig:
        """Under a cap, no memory arena and freed blocks back to the OS: RSS follows the plan."""
        capped = schedule.memory_limit is not None
        return cls(enable_cpu_mem_arena=not capped, return_freed_memory=capped, prepack_weights=prepack_weights)


class Runtime:
    """Runs one schedule. The schedule's ``cached`` segments keep their sessions for
    the next run; any other segment's session (and with it its weights) lives only
    while the segment runs, and the next segment's session is built while it runs
    when the schedule prefetches."""

    tracer: NullRecorder = NULL_RECORDER   # a TraceRecorder while traced (runtime/tracing.py)

    def __init__(self, source: ModelSource, schedule: Schedule, config: SessionConfig | None = None) -> None:
        self.source = source
        self.schedule = schedule
        self.config = config or SessionConfig()
        if self.config.return_freed_memory:
            return_freed_memory(MMAP_THRESHOLD_BYTES)
        self.weights = WeightStore(source, schedule.tensors)
        if schedule.weights_on_disk:
            self.weights.spill_embedded()  # weights read by sessions from a file, never from the proto
        self._node_protos: dict[str, NodeProto] | None = None
        self._segment_models: dict[int, bytes] = {}
        self._tile_models: dict[tuple, bytes] = {}   # tiled steps' one-node models, weightless
        self._tile_sessions: dict[tuple, ort.InferenceSession] = {}   # fed tiles' sessions, kept across runs
        self._tile_major: dict[int, Path | None] = {}   # by step: its tiles' tile-major copy (None: none)
        # Relaid segments' (by index) and tiles' (by step, start, stop) data files, once built,
        # and where their sessions map them, once found.
        self._relaid: dict[Hashable, Path] = {}
        self._relaid_pages: dict[Hashable, tuple[pages.PageRange, ...]] = {}
        self._unwritten: set[Path] = set()   # relaid data files no session wrote into
        # Segment rule 14: the sessions share onnxruntime's arena, kept by runs that build nothing.
        self._shared_arena = self.config.return_freed_memory and schedule.kept_heap_bytes > 0
        self._arena_kept = False   # this run keeps the shared arena's pages
        self._run_options: ort.RunOptions | None = None
        kept = frozenset(segment.index for segment in schedule.segments if segment.persistent)
        self.pool = SessionPool(_weak_builder(self), kept, schedule.prefetch)
        self._whole_model_ms: float | None = None
        self.stats = RunStats(mode=schedule.mode)
        # Inputs no segment reads and no output returns are not held: the plan does not count them.
        self._held_feeds = frozenset(n for seg in schedule.segments for n in seg.inputs) | set(schedule.graph_outputs)
        # Per segment, every tensor a step of it marks unneeded: dropped once the segment returns.
        self._frees_after_segment = [tuple(t for i in seg.steps for t in schedule.steps[i].frees)
                                     for seg in schedule.segments]
        self._expected_feeds = {name: _expected_feed(name, schedule) for name in schedule.graph_inputs}
        self._output_names = list(schedule.graph_outputs)

    @property
    def prepack_weights(self) -> bool:
        """False when the config asks so, or the schedule was planned so (its plan counts
        unpacked weights, which packing would exceed)."""
        return self.config.prepack_weights and self.schedule.prepack_weights

    # -- sessions -----------------------------------------------------------------------
    def _options(self, prepack: bool | None = None, external_folder: Path | None = None,
                 shared_arena: bool = False) -> ort.SessionOptions:
        # Relative external-data locations resolve against the model's folder (or the spill
        # folder); a relaid segment's, against the folder of the optimizer's files.
        return session_options(threads=self.config.intra_op_num_threads, arena=self.config.enable_cpu_mem_arena,
                               prepack=self.prepack_weights if prepack is None else prepack,
                               spinning=self.schedule.intra_op_spinning,
                               external_folder=external_folder or self.weights.folder, shared_arena=shared_arena)

    def session(self, segment: Segment) -> ort.InferenceSession:
        """The session of ``segment``: kept, prefetched, or built now."""
        return self.pool.acquire(segment.index)

    def _next_segment(self, index: int) -> int | None:
        if index + 1 < len(self.schedule.segments):
            return index + 1
        return 0 if self.schedule.cyclic_prefetch and index > 0 else None

    def _build_session(self, index: int) -> ort.InferenceSession:
        segment = self.schedule.segments[index]
        disabled = [] if segment.fold_constants else ["ConstantFolding"]
        model: bytes | str
        try:
            if segment.relaid:
                relaid = self._relaid_model(segment, disabled)
                model = str(relaid)
                # Its kernels take their packed weights from its file: packing stays on.
                options = self._options(prepack=True, external_folder=relaid.parent, shared_arena=self._shared_arena)
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done already
            else:
                model = self._segment_model(segment)
                options = self._options(shared_arena=self._shared_arena)
            options = self.tracer.session_options(options, index)
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=disabled)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            first = self.schedule.steps[segment.first_step]
            raise UnsupportedModelError(
                f"{self.source.label}: onnxruntime cannot load segment {segment.index} "
                f"(steps {segment.first_step}-{segment.last_step}, from node {first.node!r}): "
                f"{_first_line(exc)}") from None
        self.tracer.session_built(index, session, segment.held_bytes)
        return session

    def _segment_model(self, segment: Segment) -> bytes | str:
        if self.schedule.whole_model:
            return str(self.source.path) if self.source.path else self.source.proto.SerializeToString()
        model = self._segment_models.get(segment.index)
        if model is None:
            proto = build_segment_model(self.source, self.schedule, segment, self._nodes(), self.weights.protos)
            model = (proto if segment.region is None else region_model(
                proto, segment.region, [self.schedule.steps[i].node for i in segment.steps])).SerializeToString()
            if len(model) <= KEPT_SEGMENT_MODEL_BYTES:  # memory_opt creates it again every run
                self._segment_models[segment.index] = model
        return model

    def _relaid_model(self, segment: Segment, disabled: list[str]) -> Path:
        """The segment optimized with its fed weights as constants, packed (made once,
        cached on disk); records the data file its session maps."""
        constants = dataclasses.replace(segment, fed_weights=())
        relaid = relaid_model(build_segment_model(self.source, self.schedule, constants, self._nodes(),
                                                  self.weights.protos),
                              self._options(prepack=True), self.weights.folder, disabled)
        self._relaid[segment.index] = relaid.data
        self._relaid_pages.pop(segment.index, None)   # a new session maps it anew
        return relaid.model

    def _fed_spans(self, segment: Segment) -> list[FileSpan]:
        """Where the weights fed to ``segment`` are (none for a relaid segment: its session maps its own)."""
        if segment.relaid:
            return []
        return [span for span in map(self.weights.span, segment.fed_weights) if span is not None]

    def _mapped_pages(self, key: Hashable) -> tuple[pages.PageRange, ...]:
        """Where the session of a relaid segment (its index) or tile (step, start, stop) maps its
        data file: found once it has run, and checked to hold no page a session wrote
        (dropping it would lose it)."""
        found = self._relaid_pages.get(key)
        data = self._relaid.get(key)
        if found is None and data is not None:
            found = pages.mapped_ranges(data)
            # Checked once per data file: a session built again from it runs the same kernels.
            # Reading smaps takes 19 ms in a process with onnxruntime's mappings, and rebuilt
            # sessions (rule 9) map their file again every run: 114 ms of the YOLO-style
            # detector's 420 ms run at a quarter of onnxruntime's RSS.
            if data not in self._unwritten and pages.written_bytes(found):
                raise RuntimeExecutionError(
                    f"{self.source.label}: the session of relaid {key!r} wrote into its mapped weights ({data}); "
                    "they cannot be released after the run, so the cap cannot be kept")
            if found:
                self._relaid_pages[key] = found
                self._unwritten.add(data)
        return found or ()

    def close(self) -> None:
        """Release every session (and the weights they hold) and every weight mapping."""
        self.pool.close()
        self._tile_sessions.clear()
        self.weights.close()

    def settle(self) -> float:
        """Wait until no session is being prefetched (e.g. before timing something else);
        milliseconds waited."""
        return self.pool.settle()

    def _nodes(self) -> dict[str, NodeProto]:
        if self._node_protos is None:
            self._node_protos = nodes_by_name(self.source)
        return self._node_protos

    # -- running ------------------------------------------------------------------------
    @property
    def segment_runs(self) -> int:
        """Segments a run goes through: every segment once per chunk."""
        return len(self.schedule.segments) * len(self._chunk_starts())

    def run(self, feeds: Mapping[str, np.ndarray], progress: Callable[[int], None] | None = None
            ) -> dict[str, np.ndarray]:
        """Run the schedule; ``progress(1)`` is called after every segment (``segment_runs`` a run)."""
        if self.schedule.whole_model:
            # The fast path: onnxruntime checks the feeds itself; Hyperion only explains a failure.
            with self.tracer.span("segment 0 (whole model)", "segment", segment=0):
                session = self.session(self.schedule.segments[0])
                started = time.perf_counter()
                try:
                    outputs = session.run(self._output_names, feeds)
                except Exception as exc:  # onnxruntime raises its own untyped errors
                    self.check_feeds(feeds)  # a bad feed becomes a FeedError naming the input
                    raise RuntimeExecutionError(f"{self.source.label}: onnxruntime failed: "
                                                f"{_first_line(exc)}") from None
            self._whole_model_ms = 1e3 * (time.perf_counter() - started)
            if progress is not None:
                progress(1)
            return dict(zip(self._output_names, outputs, strict=True))
        checked = self.check_feeds(feeds)
        started = time.perf_counter()
        self._tune_heap()
        self.pool.reset_times()
        self.weights.fed_bytes = 0
        segment_ms = [0.0] * len(self.schedule.segments)
        held_peak, chunks = 0, 0
        outputs: dict[str, np.ndarray] = {}
        total = self.schedule.streaming.batch_size if self.schedule.streaming is not None else 0
        for start, part in self._chunks(checked):
            result, held = self._run_segments(part, segment_ms, progress)
            held_peak, chunks = max(held_peak, held), chunks + 1
            if start is None:
                outputs = result
                continue
            for name, value in result.items():  # written into whole-batch arrays: no concatenation copy
                if name not in outputs:
                    outputs[name] = np.empty((total, *value.shape[1:]), value.dtype)
                outputs[name][start:start + len(value)] = value
            del result
        self.stats = RunStats(self.schedule.mode, max(self.schedule.peak_bytes, held_peak), held_peak,
                              segment_ms, 1e3 * (time.perf_counter() - started), chunks, self.pool.reset_times(),
                              self.weights.fed_bytes)
        return outputs

    def _tune_heap(self) -> None:
        """Under a cap, glibc gives freed large blocks back to the OS, and so does the shared
        arena, unless the schedule keeps it (``kept_heap_bytes``) and this run builds no
        session: a run that builds one gives the arena's free regions back after every
        segment, so that no session is created beside what the runs before left in it."""
        if not self.config.return_freed_memory:
            return
        return_freed_memory(MMAP_THRESHOLD_BYTES)
        self._arena_kept = self._shared_arena and self.pool.all_kept()
        self._run_options = shrinking_run_options() if self._shared_arena and not self._arena_kept else None
        if self._arena_kept:
            note_arena_kept()
        else:
            release_free_heap()   # what another schedule's runs kept in this process, its plan does not count
        if not self._shared_arena:
            shrink_shared_arena()

    @contextlib.contextmanager
    def _tile_sized_blocks_mapped(self, segment: Segment) -> Iterator[None]:
        """Under a cap, while the region of a segment rebuilt every run runs, blocks from
        ``REGION_MMAP_THRESHOLD_BYTES`` up mapped alone."""
        if not self.config.return_freed_memory or self.pool.is_kept(segment.index):
            yield
            return
        return_freed_memory(REGION_MMAP_THRESHOLD_BYTES)
        try:
            yield
        finally:
            return_freed_memory(MMAP_THRESHOLD_BYTES)

    def _chunk_starts(self) -> Sequence[int | None]:
        """The first sample of every chunk of a streaming schedule; [None]: the batch is whole."""
        streaming = self.schedule.streaming
        return [None] if streaming is None else range(0, streaming.batch_size, streaming.chunk)

    def _chunks(self, feeds: dict[str, np.ndarray]) -> Iterator[tuple[int | None, dict[str, np.ndarray]]]:
        """(first sample, feeds) per chunk of a streaming schedule; (None, feeds) otherwise."""
        streaming = self.schedule.streaming
        if streaming is None:
            yield None, feeds
            return
        chunk, batched = streaming.chunk, set(streaming.batched_inputs)
        for start in self._chunk_starts():  # slices along axis 0 are views: no copies of the inputs
            with self.tracer.span(f"chunk {start}:{min(start + chunk, streaming.batch_size)}", "chunk"):
                yield start, {n: v[start:start + chunk] if n in batched else v for n, v in feeds.items()}

    def _run_segments(self, env: dict[str, np.ndarray], segment_ms: list[float],
                      progress: Callable[[int], None] | None) -> tuple[dict[str, np.ndarray], int]:
        """Every segment once, in order; the graph outputs and the most bytes held between segments."""
        env = {name: value for name, value in env.items() if name in self._held_feeds}
        held_peak = 0
        for segment, frees in zip(self.schedule.segments, self._frees_after_segment, strict=True):
            t0 = time.perf_counter()
            with self.tracer.span(f"segment {segment.index}", "segment", segment=segment.index,
                                  steps=f"{segment.first_step}-{segment.last_step}"):
                outputs = self._run_segment(segment, {name: env[name] for name in segment.inputs})
            env.update(zip(segment.outputs, outputs, strict=True))
            del outputs
            held = sum(a.nbytes for a in env.values() if isinstance(a, np.ndarray))
            held_peak = max(held_peak, held)
            self.tracer.counter(HELD_COUNTER, held)
            for name in frees:
                env.pop(name, None)
            segment_ms[segment.index] += 1e3 * (time.perf_counter() - t0)
            if progress is not None:
                progress(1)
        return {name: env[name] if name in env else self.weights.read(name)
                for name in self.schedule.graph_outputs}, held_peak

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
        return dict(zip(segment.outputs, self._run_segment(segment, dict(feeds)), strict=True))

    def _run_segment(self, segment: Segment, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not segment.outputs:
            # Only dead nodes (outputs nobody reads): nothing to compute, and onnxruntime
            # refuses both a run that fetches nothing and a graph with no outputs.
            return []
        step = self.schedule.steps[segment.first_step]
        if step.row_gather is not None or step.tiles is not None:  # a segment of its own, run here
            self._prefetch(self._next_segment(segment.index))
            if step.row_gather is not None:
                return [self._gather_rows(segment, step.row_gather, feeds[step.row_gather.indices])]
            return [self._run_tiles(segment, step.tiles, feeds)]
        built = self.pool.times.built
        session = self.session(segment)
        self._prefetch(self._next_segment(segment.index))  # while this one computes
        model_feeds = self._model_feeds(segment, feeds)
        if segment.fed_weights and not segment.relaid:
            model_feeds = {**model_feeds, **{name: self.weights.view(name) for name in segment.fed_weights}}
        try:
            if segment.region is not None:
                with self.tracer.span(f"{len(segment.region.bounds) - 1} tiles of segment {segment.index}", "region",
                                      segment=segment.index), self._tile_sized_blocks_mapped(segment):
                    return run_region(session, segment.region, model_feeds, self._region_outputs(segment))
            return session.run(list(segment.outputs), model_feeds, self._run_options)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeExecutionError(
                f"{self.source.label}: onnxruntime failed in segment {segment.index} "
                f"(steps {segment.first_step}-{segment.last_step}): {_first_line(exc)}") from None
        finally:
            del model_feeds
            self.weights.advise(self._fed_spans(segment), mmap.MADV_DONTNEED)   # RSS falls back
            if segment.relaid:
                pages.drop(self._mapped_pages(segment.index))
            if self.config.return_freed_memory and not self._arena_kept and (
                    segment.relaid or self.pool.times.built > built):
                # A relaid segment's packed kernels and a session's creation leave free pages
                # between live heap blocks (10-19 MiB after whisper-tiny's decoder; trimmed after
                # each of Inception-v2's 15 normal-mode sessions was built, its first run peaked
                # 11.6 MiB lower), resident until trimmed (0.1 ms).
                release_free_heap()

    def _region_outputs(self, segment: Segment) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """A region's outputs as the schedule records them: dtype and whole shape."""
        return {name: (np.dtype(self.schedule.tensors[name].dtype),
                       tuple(int(d) for d in self.schedule.tensors[name].shape or ())) for name in segment.outputs}

    def _gather_rows(self, segment: Segment, gather: RowGather, indices: np.ndarray) -> np.ndarray:
        """A row gather (``Step.row_gather``): the rows its indices name, read from the table's file."""
        record = self.schedule.tensors[gather.weight]
        shape = tuple(int(d) for d in record.shape or ())
        span = self.weights.span(gather.weight)  # the located file (contained), or None: kept in the proto
        table = self.weights.read(gather.weight) if span is None else None
        with self.tracer.span(f"row gather {gather.weight}", "row_gather", segment=segment.index):
            return gather_rows(gather, self.schedule.steps[segment.first_step].node, indices,
                               np.dtype(record.dtype), shape[1:], None if span is None else span.path,
                               0 if span is None else span.offset, table)

    def _run_tiles(self, segment: Segment, tiles: Tiles, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """A tiled step (``Step.tiles``): tile by tile, each from one weight tile, into one output."""
        step = self.schedule.steps[segment.first_step]
        node = self._nodes()[step.node]
        shape = tuple(int(d) for d in self.schedule.tensors[tiles.weight].shape or ())
        span = self.weights.span(tiles.weight)  # the located file (contained), or None: kept in the proto
        whole = self.weights.read(tiles.weight) if span is None else None

        def read_tile(start: int, stop: int, buffer: np.ndarray, skip: np.ndarray | None) -> np.ndarray:
            if reader is not None:
                return reader(start, stop, buffer, skip)
            assert whole is not None   # copied into the buffer, as a tile read from a file is
            tile = whole[(slice(None),) * tiles.weight_axis + (slice(start, stop),)]
            into = buffer[:tile.size].reshape(tile.shape)
            np.copyto(into, tile)
            return into

        inputs = {name: feeds[name] for name in dict.fromkeys(node.input) if name in feeds}
        sliced = [tiles.weight] + ([tiles.bias] if tiles.bias is not None and tiles.bias not in inputs else [])
        spans = {name: self.weights.span(name) for name in sliced}
        # Declared in their own files (never read: the tiles replace them), so sessions use the tiles in place.
        locations = {name: (os.path.relpath(found.path, self.weights.folder), found.offset)
                     for name, found in spans.items() if found is not None}
        in_place = tiles.initializers_in_place and len(locations) == len(sliced)
        output_shape = [int(d) for d in self.schedule.tensors[tiles.output].shape or ()]
        if self.schedule.streaming is not None:  # chunks: the batch axis is the chunk's
            output_shape[0] = len(next(iter(inputs.values())))
        reader = None if span is None else self._tile_reader(step.index, tiles, shape, span, tuple(output_shape))

        def key_of(width: int, tile_inputs: Mapping[str, np.ndarray]) -> tuple:
            return step.index, width, tuple(v.shape for v in tile_inputs.values())

        def build(width: int, tile_inputs: Mapping[str, np.ndarray]) -> bytes:
            key = key_of(width, tile_inputs)
            if key not in self._tile_models:
                self._tile_models[key] = tile_model(node, tiles, width, shape, tile_inputs, self.weights.protos,
                                                    list(self.source.proto.opset_import),
                                                    locations if in_place or tiles.relaid else {})
            return self._tile_models[key]

        def kept(width: int, tile_inputs: Mapping[str, np.ndarray]) -> ort.InferenceSession:
            key = key_of(width, tile_inputs)
            if key not in self._tile_sessions:
                self._tile_sessions[key] = ort.InferenceSession(build(width, tile_inputs), self._options(),
                                                                providers=["CPUExecutionProvider"])
            return self._tile_sessions[key]

        def relaid(start: int, stop: int, tile_inputs: Mapping[str, np.ndarray],
                   supplied: Callable[[], dict[str, np.ndarray]]) -> tuple[ort.InferenceSession, Callable[[], None]]:
            key = (step.index, start, stop)
            if key not in self._tile_sessions:
                # A weight kept in the proto (small) has no file to key the cache by: its bytes do.
                in_proto = sha256(b"".join(self.weights.read(name).tobytes() for name in sliced
                                                   if spans[name] is None)).hexdigest()
                self._tile_sessions[key], self._relaid[key] = self._relaid_tile(
                    onnx.load_model_from_string(build(stop - start, tile_inputs)), supplied,
                    f"{start}:{stop}:{in_proto}")
            return self._tile_sessions[key], lambda: pages.drop(self._mapped_pages(key))

        with self.tracer.span(f"{len(tiles.bounds) - 1} tiles of {step.node}", "tiles", segment=segment.index):
            bias = self.weights.read(tiles.bias) if tiles.bias is not None and tiles.bias not in inputs else None
            try:
                with reader or contextlib.nullcontext():
                    return run_tiles(tiles, step.node, tuple(output_shape), shape, inputs, read_tile, bias, build,
                                     self._options, in_place, kept if tiles.fed else None,
                                     relaid if tiles.relaid else None)
            finally:
                if tiles.relaid:
                    release_free_heap()   # as after a relaid segment

    def _tile_reader(self, step: int, tiles: Tiles, shape: tuple[int, ...], span: FileSpan,
                     output_shape: tuple[int, ...]) -> WeightTileReader | TileMajorReader:
        """What reads the tiles of ``step`` from the weight's file -- or, for ``tiles.tile_major``,
        from its tile-major copy, written now (one tile at a time, in a buffer of the plan's
        staging) if it is not cached yet."""
        strided = WeightTileReader(span.path, span.offset, tiles.weight, shape, tiles.weight_axis)
        if not tiles.tile_major:
            return strided
        if step not in self._tile_major:
            copy: Path | None = tile_major_copy(span.path, span.offset, span.length, tiles)
            if not copy.is_file():
                staging = Staging(tiles, shape, output_shape)
                try:
                    write_tile_major(strided, tiles, staging.weight, staging.skip, copy)
                except OSError as exc:   # a cache that cannot be written: strided reads, every run
                    log.warning("%s: tiles of %r read from the weight's file: %s", copy, tiles.weight, exc)
                    copy = None
                del staging
            self._tile_major[step] = copy
        copy = self._tile_major[step]
        return strided if copy is None else TileMajorReader(copy, tiles.weight, shape)

    def _relaid_tile(self, model: onnx.ModelProto, supplied: Callable[[], dict[str, np.ndarray]],
                     salt: str) -> tuple[ort.InferenceSession, Path]:
        """A relaid tile's session: ``model`` (its weight tiles declared in their weights'
        files) packed once by onnxruntime's optimizer (cached; the tiles are read, by
        ``supplied()``, only to make it), then loaded mapped."""
        relaid = cached_relaid(model, self.weights.folder, salt)
        if relaid is None:
            # onnxruntime writes a model's initializers as the model declares them, not as
            # handed over: the tile (a column block is not contiguous in the weight's file)
            # goes to a file of its own, which the model built from declares.
            with scratch_folder() as scratch:
                built_from = tile_in_file(model, supplied(), Path(scratch))
                options = self._options(prepack=True, external_folder=Path(scratch))
                relaid = relaid_model(model, options, self.weights.folder, [], salt, built_from)
        mapped = self._options(prepack=True, external_folder=relaid.model.parent)
        mapped.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # done already
        session = ort.InferenceSession(str(relaid.model), mapped, providers=["CPUExecutionProvider"])
        return session, relaid.data

    def _prefetch(self, index: int | None) -> None:
        """Get segment ``index`` ready: its session built in the background (when it is not
        kept) and its fed weights read ahead into the page cache. Row gathers and tiled steps
        have neither: they read their weights in part when they run."""
        first = self.schedule.steps[self.schedule.segments[index].first_step] if index is not None else None
        if first is None or not self.schedule.prefetch or first.row_gather is not None or first.tiles is not None:
            return
        self.pool.prefetch(index)
        segment = self.schedule.segments[index]
        self.weights.advise(self._fed_spans(segment), mmap.MADV_WILLNEED)
        if segment.relaid and segment.index in self._relaid_pages:
            pages.advise(self._relaid_pages[segment.index], mmap.MADV_WILLNEED)

    @staticmethod
    def _model_feeds(segment: Segment, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` less the small constants the segment's model recomputes itself."""
        names = segment.model_inputs
        return feeds if len(names) == len(feeds) else {name: feeds[name] for name in names}

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
                        d is not None and d != v for d, v in zip(shape, value.shape, strict=True))):
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
        return record is not None and record.role is TensorRole.WEIGHT


def _expected_feed(name: str, schedule: Schedule) -> tuple[np.dtype | None, tuple[int | None, ...] | None]:
    """(dtype, shape with None for free dims) of an input; dtype None for non-tensor inputs."""
    record = schedule.tensors[name]
    if record.dtype not in np.sctypeDict:
        return None, None  # sequences, optionals, maps: onnxruntime checks them itself
    shape = schedule.input_shapes.get(name)
    return np.dtype(record.dtype), None if shape is None else tuple(d if isinstance(d, int) else None
                                                                    for d in shape)


def _weak_builder(runtime: Runtime) -> Callable[[int], ort.InferenceSession]:
    """``runtime._build_session`` without a reference to ``runtime``.

    The pool belongs to the runtime; a bound method would close a cycle, and a
    dropped model's sessions (their weights, their thread pools) would then live
    on until the garbage collector's next full pass.
    """
    ref = weakref.ref(runtime)

    def build(index: int) -> ort.InferenceSession:
        owner = ref()
        if owner is None:
            raise RuntimeExecutionError("the runtime that owns this session pool was dropped")
        return owner._build_session(index)

    return build


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
