"""Side-by-side measurements of Hyperion and plain onnxruntime on one model.

Latency: both run in this process, interleaved run by run, with the same
thread settings; the figure is the median. Memory: each side runs in a fresh
subprocess that reports its peak RSS; the figure is that minus the peak RSS of
a process that only imports hyperion and onnxruntime (SPEC's definition).

A cap may be a fraction of plain onnxruntime's peak RSS on the model (``"50%"``,
:class:`OrtFraction`): that figure is measured first, the same way, and the cap is the
fraction of it.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hyperion.errors import OptionError
from hyperion.tools import report
from hyperion.tools.rss import peak_rss_bytes
from hyperion.units import format_size, parse_size


@dataclass(frozen=True)
class OrtFraction:
    """A cap given as a fraction of plain onnxruntime's measured peak RSS on the model."""

    fraction: float

    def __str__(self) -> str:
        return f"{100 * self.fraction:g}%"


def parse_limit(text: str, option: str = "--memory-limit") -> int | OrtFraction:
    """``"50%"``: half of plain onnxruntime's peak RSS on the model; else a size (``"256MB"``)."""
    if text.strip().endswith("%"):
        try:
            percent = float(text.strip()[:-1])
        except ValueError:
            percent = 0.0
        if not 0 < percent < float("inf"):
            raise OptionError(f"{option}: cannot read {text!r} as a percentage of onnxruntime's RSS; use e.g. '50%'")
        return OrtFraction(percent / 100)
    size = parse_size(text, option)
    assert size is not None
    return size


@dataclass(frozen=True)
class BenchRow:
    model: str
    memory_limit: int | None
    mode: str
    segments: int
    ort_ms: float
    hyperion_ms: float
    accounted_peak_bytes: int
    ort_rss_bytes: int | None
    hyperion_rss_bytes: int | None
    ort_fraction: float | None = None   # the cap was this fraction of ort_rss_bytes

    @property
    def latency_ratio(self) -> float:
        return self.hyperion_ms / self.ort_ms


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def interleaved_latency(first: Callable[[], object], second: Callable[[], object], repeats: int,
                        warmup: int = 2) -> tuple[float, float]:
    """Median milliseconds of ``first`` and ``second``, alternated run by run."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return _median_ms(a), _median_ms(b)


def ort_session(model: Path, prepack_weights: bool = True) -> ort.InferenceSession:
    """Plain onnxruntime on ``model``; ``prepack_weights=False`` runs the same unpacked
    kernels as a Hyperion model compiled so."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not prepack_weights:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def bench_model(model: Path, limits: Sequence[int | OrtFraction | None], *, mode: str = "adaptive",
                input_shapes: Mapping[str, Sequence[int]] | None = None, repeats: int = 20,
                measure_rss: bool = True, seed: int = 0, prepack_weights: bool | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[BenchRow]:
    """Hyperion under each of ``limits`` next to plain onnxruntime as installed (which
    pre-packs weights whatever ``prepack_weights`` Hyperion compiles with). An
    :class:`OrtFraction` cap is that fraction of onnxruntime's peak RSS, measured first (even
    without ``measure_rss``). ``progress(done, total)`` after each measurement (a compile, a
    latency pair, an RSS pair, onnxruntime's RSS)."""
    fractions = any(isinstance(limit, OrtFraction) for limit in limits)
    total, done = len(limits) * (3 if measure_rss else 2) + fractions, 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    import hyperion
    from hyperion.tools.feeds import input_shapes_of, random_feeds

    probe = hyperion.compile(model, input_shapes=input_shapes)
    shapes = input_shapes_of(probe.base_ir, input_shapes)
    feeds = random_feeds(probe.base_ir, shapes, seed)
    session = ort_session(model)
    ort_rss = None
    if fractions:
        ort_rss = ort_rss_bytes(model, feeds)
        advance()
    rows = []
    for requested in limits:
        limit = max(1, int(requested.fraction * (ort_rss or 0))) if isinstance(requested, OrtFraction) else requested
        cm = hyperion.compile(model, memory_limit=limit, mode=mode, input_shapes=shapes,
                              prepack_weights=prepack_weights)
        advance()
        ort_ms, hyperion_ms = interleaved_latency(functools.partial(session.run, None, feeds),
                                                  functools.partial(cm.run, feeds), repeats)
        advance()
        row_ort_rss = hyperion_rss = None
        if measure_rss:
            row_ort_rss, hyperion_rss = rss_pair(model, feeds, limit, mode, shapes, prepack_weights)
            advance()
        rows.append(BenchRow(model.stem, limit, cm.schedule.mode, len(cm.schedule.segments), ort_ms, hyperion_ms,
                             cm.schedule.peak_bytes, row_ort_rss, hyperion_rss,
                             requested.fraction if isinstance(requested, OrtFraction) else None))
    return rows


# -- peak RSS in subprocesses ----------------------------------------------------------
def rss_pair(model: Path, feeds: Mapping[str, np.ndarray], limit: int | None, mode: str,
             shapes: Mapping[str, Sequence[int]], prepack_weights: bool | None = None) -> tuple[int, int]:
    """(plain onnxruntime, Hyperion) peak RSS above the import-only baseline, in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        args = {"model": str(model), "feeds": str(feeds_path), "limit": limit, "mode": mode,
                "shapes": {k: list(v) for k, v in shapes.items()}, "prepack_weights": prepack_weights}
        baseline = _child_rss("baseline", args)
        return _child_rss("ort", args) - baseline, _child_rss("hyperion", args) - baseline


def ort_rss_bytes(model: Path, feeds: Mapping[str, np.ndarray]) -> int:
    """Plain onnxruntime's peak RSS on ``model`` above the import-only baseline: what a cap of
    ``"50%"`` is a fraction of."""
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        args = {"model": str(model), "feeds": str(feeds_path)}
        return _child_rss("ort", args) - _child_rss("baseline", args)


def _child_rss(kind: str, args: dict) -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "hyperion.tools.bench", kind, json.dumps(args)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed: {done.stderr.strip().splitlines()[-1:]}")
    return int(done.stdout.strip().splitlines()[-1])


def _child(kind: str, args: dict) -> None:
    import hyperion  # noqa: F401  (the baseline includes importing both)

    if kind != "baseline":
        feeds = dict(np.load(args["feeds"]))
        if kind == "ort":
            ort_session(Path(args["model"])).run(None, feeds)
        else:
            cm = hyperion.compile(args["model"], memory_limit=args["limit"], mode=args["mode"],
                                  input_shapes=args["shapes"], prepack_weights=args["prepack_weights"])
            cm.run(feeds)
    print(peak_rss_bytes())


# -- tables -------------------------------------------------------------------------------
def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)


def _cap(row: BenchRow) -> str:
    if not row.memory_limit:
        return "none"
    share = "" if row.ort_fraction is None else f" ({100 * row.ort_fraction:g}% of onnxruntime)"
    return _size(row.memory_limit) + share


BENCH_HEADER = ("model", "cap", "mode", "segments", "onnxruntime ms", "hyperion ms", "ratio", "accounted peak",
                "onnxruntime RSS", "hyperion RSS")


def markdown_table(rows: Sequence[BenchRow]) -> str:
    return report.markdown_table(BENCH_HEADER, (
        (r.model, _cap(r), r.mode, r.segments, f"{r.ort_ms:.3f}",
         f"{r.hyperion_ms:.3f}", f"{r.latency_ratio:.2f}x", _size(r.accounted_peak_bytes), _size(r.ort_rss_bytes),
         _size(r.hyperion_rss_bytes)) for r in rows))


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]))
