"""The onnxruntime sessions of one schedule: built on demand, kept, or prefetched.

A session owns its segment's weights (onnxruntime reads them from the
external-data file when it is created, and releases them when it is dropped),
so keeping, prefetching and dropping sessions is how weights are loaded,
cached and evicted:

* kept sessions (the schedule's ``cached`` segments: all of them in ``normal``
  mode, the weight cache's in ``memory_opt``) stay alive across runs;
* with the schedule's ``prefetch``, the next segment's session is built on a background thread
  while the current segment computes (onnxruntime releases the GIL in both);
  at most one build is pending, and a session is dropped before the build
  after next starts, so at most two uncached sessions exist at once -- what
  the plan accounts.

:func:`session_options` is the one recipe of onnxruntime session options.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from hyperion.passes.memory.ort_arena import ARENA_INITIAL_BYTES, ARENA_MAX_DEAD_BYTES_PER_CHUNK
from hyperion.runtime.trace import NULL_RECORDER, SESSIONS_TRACK, NullRecorder

log = logging.getLogger(__name__)

Builder = Callable[[int], ort.InferenceSession]


@dataclass
class SessionTimes:
    """Where session time went in one run."""

    build_ms: float = 0.0       # creating sessions, on any thread
    wait_ms: float = 0.0        # the run blocked waiting for a session (built inline or still prefetching)
    built: int = 0
    prefetched: int = 0         # sessions that were ready (or in progress) when the run needed them
    reused: int = 0             # kept sessions used again


def session_options(*, threads: int = 0, arena: bool = True, prepack: bool = True, spinning: bool = True,
                    external_folder: str | os.PathLike | None = None, shared_arena: bool = False
                    ) -> ort.SessionOptions:
    """onnxruntime's session options as Hyperion (and its tests and benchmarks) use them.

    * ``threads``: intra-op threads; 0 lets onnxruntime use one per core.
    * ``arena``: onnxruntime's CPU memory arena and memory patterns. The arena keeps
      freed blocks for reuse, so RSS never falls back after a peak; a memory pattern
      allocates one block per run for all of a session's intermediates, laid out by
      onnxruntime's own planner for its own node order (on the YOLO-style detector at
      half of onnxruntime's RSS, 13 MiB more peak than allocating each tensor). Both
      off under a cap, where RSS must follow Hyperion's plan; on otherwise, where they
      save allocations.
    * ``prepack``: MatMul/Gemm weights packed into a second, kernel-friendly copy
      when the session is created. Packing is most of a session's creation (18 of
      19 ms for a 2240x2240 float32 weight) and holds the weight twice; unpacked,
      MLAS packs panels during each GEMM, which sums in another order, so outputs
      differ from the packed ones by float32 rounding.
    * ``spinning``: idle intra-op workers spin waiting for work (onnxruntime's
      default). Right for one session; with segments run one after another and
      sessions built while others compute, spinning workers steal the CPU from the
      next segment, and a session with them took 28 ms to destroy against 0.1 ms.
    * ``external_folder``: where relative external-data locations resolve when the
      model is given as bytes (a segment model, or weights spilled to a file).
    * ``shared_arena``: the session allocates its tensors from the process's one shared
      arena (:func:`shared_arena_registered`), which keeps its pages between runs (segment rule 14),
      and its initializers outside it; no memory pattern (the plan's tensors, one by one).

    Warnings are off (severity 3): onnxruntime warns about things that are expected
    here, such as initializers listed as graph inputs in old opsets.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = arena
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(external_folder))
    if shared_arena:
        shared_arena_registered()
        options.enable_cpu_mem_arena = True
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    return options


@functools.cache
def shared_arena_registered() -> None:
    """Register the process's shared CPU arena with onnxruntime, once: sessions made with
    ``shared_arena`` allocate from it. Configured as ``passes/memory/ort_arena.py`` models
    it: regions doubling from 1 MiB (again after a shrink), chunks split whenever 256 bytes
    are left over."""
    config = ort.OrtArenaCfg({"max_mem": 0, "arena_extend_strategy": 0,   # kNextPowerOfTwo
                              "initial_chunk_size_bytes": ARENA_INITIAL_BYTES,
                              "initial_growth_chunk_size_bytes": ARENA_INITIAL_BYTES,   # after a shrink
                              "max_dead_bytes_per_chunk": ARENA_MAX_DEAD_BYTES_PER_CHUNK})
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, config)


# Whether a run that kept the shared arena ended since it was last shrunk: a schedule that
# keeps none shrinks it only then, not on every run (the shrink is one onnxruntime run).
_arena_left_grown = False


def note_arena_kept() -> None:
    """A run kept the shared arena's pages: the next run without it shrinks it first."""
    global _arena_left_grown
    _arena_left_grown = True


def shrink_shared_arena() -> None:
    """Give the shared arena's free regions back if a run kept it since the last shrink: a
    schedule that does not keep it does not count what another one's runs left in it."""
    global _arena_left_grown
    if _arena_left_grown:
        session, feeds = _shrinker()
        session.run(None, feeds, shrinking_run_options())
        _arena_left_grown = False


@functools.cache
def _shrinker() -> tuple[ort.InferenceSession, dict[str, Any]]:
    """A one-node session on the shared arena: its runs shrink it (onnxruntime shrinks an arena
    only when a run of a session using it ends)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "shrink",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads=1, shared_arena=True),
                                   providers=["CPUExecutionProvider"])
    return session, {"x": np.zeros(1, np.float32)}


@functools.cache
def shrinking_run_options() -> ort.RunOptions:
    """Run options that make onnxruntime give the shared arena's free regions back when a
    run ends (all but its first, 1 MiB)."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class SessionPool:
    """Sessions of one schedule's segments: ``keep`` are the schedule's cached segments,
    ``prefetch`` whether the next one is built in the background. ``build`` must not
    hold its runtime strongly (see ``executor._weak_builder``)."""

    tracer: NullRecorder = NULL_RECORDER   # a TraceRecorder while traced (runtime/tracing.py)

    def __init__(self, build: Builder, keep: frozenset[int], prefetch: bool) -> None:
        self._build_fn = build
        self._keep = keep
        self._prefetch = prefetch
        self._kept: dict[int, ort.InferenceSession] = {}
        self._pending: tuple[int, Future[ort.InferenceSession]] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.times = SessionTimes()

    def reset_times(self) -> SessionTimes:
        times, self.times = self.times, SessionTimes()
        return times

    def _build(self, index: int) -> ort.InferenceSession:
        started = time.perf_counter()
        with self.tracer.session_span(index):
            session = self._build_fn(index)
        with self._lock:
            self.times.build_ms += 1e3 * (time.perf_counter() - started)
            self.times.built += 1
        return session

    def acquire(self, index: int) -> ort.InferenceSession:
        """The session of segment ``index``: kept, prefetched, or built now."""
        if index in self._kept:
            self.times.reused += 1
            return self._kept[index]
        started = time.perf_counter()
        with self.tracer.span(f"wait for session {index}", "session", SESSIONS_TRACK, segment=index):
            session = self._take_pending(index)
        if session is None:
            session = self._build(index)
        else:
            self.times.prefetched += 1
        self.times.wait_ms += 1e3 * (time.perf_counter() - started)
        if index in self._keep:
            self._kept[index] = session
        return session

    def _take_pending(self, index: int) -> ort.InferenceSession | None:
        if self._pending is None:
            return None
        pending_index, future = self._pending
        self._pending = None
        session = future.result()   # a build error surfaces here, in the run that needs it
        if pending_index == index:
            return session
        del session  # prefetched for another order of segments: drop it before building
        return None

    def prefetch(self, index: int | None) -> None:
        """Start building segment ``index``'s session in the background."""
        if not self._prefetch or index is None or index in self._kept or self._pending is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hyperion-prefetch")
        self._pending = (index, self._executor.submit(self._build, index))

    def is_kept(self, index: int) -> bool:
        return index in self._kept

    def all_kept(self) -> bool:
        """Whether every session to keep is built: a run then builds none."""
        return self._keep <= self._kept.keys()

    def settle(self) -> float:
        """Wait for a pending prefetch to finish (it stays pending); milliseconds waited."""
        if self._pending is None:
            return 0.0
        started = time.perf_counter()
        self._pending[1].exception()
        return 1e3 * (time.perf_counter() - started)

    def close(self) -> None:
        """Drop every session, waiting for a pending build first."""
        if self._pending is not None:
            self._pending[1].exception()
            self._pending = None
        self._kept.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# -- the C heap --------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_heap_thresholds: int | None = None   # glibc's mmap threshold as last set here


def return_freed_memory(mmap_threshold_bytes: int) -> bool:
    """Make glibc give freed blocks of ``mmap_threshold_bytes`` or more back to the OS.

    By default glibc raises its mmap threshold to the size of the largest
    block freed (up to 32 MiB): after a 20 MB weight is released, later
    blocks of that size come from the heap and stay in RSS when freed. A fixed
    threshold keeps large blocks in their own mappings, returned on free.
    Process-wide; a no-op off glibc. Returns whether it applied.
    """
    return _set_heap_thresholds(mmap_threshold_bytes)


def _set_heap_thresholds(mmap_threshold_bytes: int) -> bool:
    global _heap_thresholds
    if _heap_thresholds == mmap_threshold_bytes:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold_bytes))
    _heap_thresholds = mmap_threshold_bytes if applied else None
    log.debug("glibc mmap threshold fixed at %d bytes: %s", mmap_threshold_bytes, applied)
    return applied


# Free heap pages below this stay. Trimming costs the next run their page faults again (up to
# 4 ms a run on ResNet-50, whose three relaid segments leave 8-10 MiB free each time), but
# whisper-tiny at a quarter of onnxruntime's RSS kept its promise only trimmed down to this:
# with 8 MiB left free it exceeded it by 7 MiB.
TRIM_FREE_HEAP_BYTES = 1 << 20


def release_free_heap(keep_bytes: int = TRIM_FREE_HEAP_BYTES) -> None:
    """Give glibc's free heap pages back to the OS (``malloc_trim``), wherever they lie,
    when more than ``keep_bytes`` lie free between live blocks.

    The trim threshold returns only the free top of the heap; a session that built and
    dropped a whole optimized graph, or a run of packed kernels, leaves small blocks' pages
    free *between* live ones (19 MiB after whisper-tiny's decoder was optimized), in RSS
    until trimmed. A no-op off glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):   # not glibc, or older than 2.33
        return
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    if info.fordblks - info.keepcost > keep_bytes:
        libc.malloc_trim(ctypes.c_size_t(0))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _libc() -> Any:
    # find_library runs ldconfig in a subprocess (2.5 ms): looked up once.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
