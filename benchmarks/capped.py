"""Hyperion under caps of plain onnxruntime's own peak RSS, on every corpus model.

For each manifest entry, at caps of ``--fractions`` (default 100%, 50%, 25%) of plain
onnxruntime's peak RSS on that model (from ``--ort-baseline``, benchmarks/ort_baseline.py's
JSON, or measured here the same way when the file is absent), and for each capped path of
``--paths`` — ``default`` (what ``hyperion.compile`` does unasked: weights packed in normal
mode, fed in the others, fed segments relaid), ``packed`` (``prepack_weights=True``: weights
pre-packed in every session, sessions of large weights rebuilt every run, exact) and ``fed``
(``prepack_weights=False``: no session packs, in any mode, weights fed from the mapped file):

* **Memory.** A fresh subprocess imports what the baseline imports (numpy, onnxruntime,
  hyperion, the corpus helpers), compiles the model under the cap and reads its VmHWM
  (*compile RSS*: nothing else has happened in the process yet, so it is the peak of a process
  that compiles and does not run), then reads the inputs the parent wrote once per model
  (``corpus.save_feeds``: numpy's random generators would page 5 MiB of their own code into
  the measured process), runs it twice and reads VmHWM again (*Hyperion RSS*).
  Both are reported above the median VmHWM of ``--repeats`` processes that only import the same
  modules (SPEC's definition). A cap no plan fits is reported as refused, with the smallest
  cap ``MemoryLimitError`` names. ``built`` and ``fed`` are the sessions built and the weight
  bytes fed during the second run (steady state).
* **Latency.** The same subprocess then stays up holding its compiled model, and a second
  long-lived subprocess holds plain onnxruntime's session on the model (``intra_op_num_threads``
  = 2, as in ort_baseline.py; Hyperion's sessions use onnxruntime's default, one thread per
  physical core, which is 2 on the machine the docs report). The parent alternates them run by
  run — one side runs while the other waits, so neither competes with the other for the cores —
  after one warm-up pair, for ``--repeats`` pairs or until ``--budget`` seconds have passed
  (at least 3 pairs), pausing ``--pause`` seconds before every run: onnxruntime's idle workers
  spin for a while after a run, and without the pause a normal-mode pair measured ResNet-50 at
  77 ms on both sides instead of 42. Reported: medians with min-max, and the ratio of the medians.
  Two processes rather than one: each side then has its own allocator, page tables and thread
  pool, as a user's process would.

Prints Markdown tables and writes every figure to ``--json``
(default benchmarks/results/capped.json).

    python benchmarks/capped.py --corpus corpus/models \
        [--ort-baseline benchmarks/results/ort_baseline.json] [--only resnet50,bert_base] \
        [--fractions 1,0.5,0.25] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 2**20
ALLOWANCE = 32 * MIB          # SPEC: peak RSS over the baseline <= memory_limit + 32 MiB
ORT_THREADS = 2               # as benchmarks/ort_baseline.py
PATHS = {"default": None, "packed": True, "fed": False}   # name -> prepack_weights


# -- the measuring children ----------------------------------------------------------------
def _reply(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def _serve(run: Any) -> None:
    """Answer each ``run`` line on stdin with the milliseconds one run took."""
    for line in sys.stdin:
        if line.strip() != "run":
            break
        started = time.perf_counter()
        run()
        _reply({"ms": 1e3 * (time.perf_counter() - started)})


def _child(args: dict[str, Any]) -> None:
    import numpy  # noqa: F401  (everything below is part of the baseline)
    import onnxruntime as ort

    import corpus
    import hyperion
    from hyperion.tools.rss import peak_rss_bytes

    kind, entry = args["kind"], args.get("entry")
    if kind == "baseline":
        _reply({"rss_bytes": peak_rss_bytes()})
        return
    if kind == "ort":
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = ORT_THREADS
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(entry["path"], options, providers=["CPUExecutionProvider"])
        feeds = corpus.load_feeds(args["feeds"])
        session.run(None, feeds)
        _reply({"ready": True})
        _serve(lambda: session.run(None, feeds))
        return
    # A cache of its own: relaid segments are optimized in this process, as on a first run anywhere.
    os.environ["HYPERION_CACHE_DIR"] = args["cache_dir"]
    started = time.perf_counter()
    try:
        cm = hyperion.compile(entry["path"], memory_limit=args["limit"], prepack_weights=args["prepack_weights"])
    except hyperion.MemoryLimitError as error:
        _reply({"refused": True, "compile_rss_bytes": peak_rss_bytes(), "node": error.node,
                "smallest_limit_bytes": error.smallest_limit_bytes, "message": str(error).splitlines()[0]})
        return
    compile_s = time.perf_counter() - started
    compile_rss = peak_rss_bytes()
    feeds = corpus.load_feeds(args["feeds"])
    cm.run(feeds)
    first_rss = peak_rss_bytes()
    cm.run(feeds)
    stats, schedule = cm.stats, cm.schedule
    _reply({"refused": False, "mode": str(getattr(schedule.mode, "value", schedule.mode)),
            "segments": len(schedule.segments), "peak_bytes": schedule.peak_bytes, "compile_s": compile_s,
            "compile_rss_bytes": compile_rss, "first_run_rss_bytes": first_rss, "rss_bytes": peak_rss_bytes(),
            "built": stats.sessions.built, "reused": stats.sessions.reused, "fed_bytes": stats.fed_bytes,
            "run_peak_bytes": stats.peak_bytes})
    _serve(lambda: cm.run(feeds))


class _Worker:
    """A child process kept up to answer ``run`` requests."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self._process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(args)], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                         text=True)

    def receive(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"child failed ({self._process.returncode}): {self._stderr.read()[-2000:]}")
        return json.loads(line)

    def run_ms(self) -> float:
        assert self._process.stdin is not None
        self._process.stdin.write("run\n")
        self._process.stdin.flush()
        return float(self.receive()["ms"])

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait()
        self._stderr.close()


@contextmanager
def _worker(args: dict[str, Any]) -> Iterator[_Worker]:
    worker = _Worker(args)
    try:
        yield worker
    finally:
        worker.close()


def _once(args: dict[str, Any]) -> dict[str, Any]:
    with _worker(args) as worker:
        return worker.receive()


# -- measurement ---------------------------------------------------------------------------
def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def alternate(ort: _Worker, hyp: _Worker, repeats: int, budget_s: float, pause_s: float) -> dict[str, Any]:
    """One warm-up pair, then pairs of runs (onnxruntime, then Hyperion) until ``repeats``
    pairs or ``budget_s`` seconds (at least three pairs); ``pause_s`` before every run lets the
    other process's idle onnxruntime workers stop spinning (they spin for a while after a run,
    onnxruntime's default, and would take a core from the side that runs)."""

    def run(worker: _Worker) -> float:
        time.sleep(pause_s)
        return worker.run_ms()

    run(ort)
    run(hyp)
    ort_ms: list[float] = []
    hyp_ms: list[float] = []
    started = time.perf_counter()
    while len(ort_ms) < repeats and (len(ort_ms) < 3 or time.perf_counter() - started < budget_s):
        ort_ms.append(run(ort))
        hyp_ms.append(run(hyp))
    return {"pairs": len(ort_ms), "ort_ms": _summary(ort_ms), "hyperion_ms": _summary(hyp_ms),
            "ratio": statistics.median(hyp_ms) / statistics.median(ort_ms), "samples": [ort_ms, hyp_ms]}


def measure_model(entry: dict[str, Any], ort_rss: int, baseline: int, fractions: list[float], repeats: int,
                  budget_s: float, pause_s: float, paths: list[str]) -> list[dict[str, Any]]:
    """Every fraction and path on one model; onnxruntime's worker serves them all."""
    import corpus

    results = []
    folder = tempfile.TemporaryDirectory(prefix="hyperion-feeds-")
    feeds = str(corpus.save_feeds(entry, Path(folder.name) / "feeds.npz"))
    with folder, _worker({"kind": "ort", "entry": entry, "feeds": feeds}) as ort:
        ort.receive()
        for fraction in fractions:
            limit = int(fraction * ort_rss)
            for path in paths:
                prepack = PATHS[path]
                print(f"  {entry['name']} at {fraction:.0%} ({limit / MIB:.1f} MiB), {path}", file=sys.stderr,
                      flush=True)
                record: dict[str, Any] = {"model": entry["name"], "family": entry["family"],
                                          "weight_bytes": entry["weight_bytes"], "fraction": fraction,
                                          "limit_bytes": limit, "path": path, "ort_rss_bytes": ort_rss}
                cache = tempfile.TemporaryDirectory(prefix="hyperion-cache-")
                args = {"kind": "hyperion", "entry": entry, "limit": limit, "prepack_weights": prepack,
                        "cache_dir": cache.name, "feeds": feeds}
                with cache, _worker(args) as hyp:
                    report = hyp.receive()
                    for key in ("compile_rss_bytes", "first_run_rss_bytes", "rss_bytes"):
                        if key in report:
                            report[key] -= baseline
                    record.update(report)
                    if not report["refused"]:
                        record["within"] = report["rss_bytes"] <= limit + ALLOWANCE
                        record["latency"] = alternate(ort, hyp, repeats, budget_s, pause_s)
                results.append(record)
    return results


def ort_figures(entries: dict[str, dict[str, Any]], path: Path | None, repeats: int) -> dict[str, int]:
    """Plain onnxruntime's peak RSS over its own import-only baseline, per model: read from
    ort_baseline.py's JSON, or measured with its code for models the file lacks."""
    known = json.loads(path.read_text())["models"] if path is not None and path.exists() else {}
    figures = {name: int(known[name]["rss_bytes"]["median"]) for name in entries if name in known}
    missing = [name for name in entries if name not in figures]
    if missing:
        import ort_baseline  # benchmarks/ort_baseline.py, beside this file

        baseline = int(statistics.median(ort_baseline._spawn("baseline", {})["rss_bytes"] for _ in range(repeats)))
        for name in missing:
            print(f"measuring plain onnxruntime on {name}", file=sys.stderr, flush=True)
            figures[name] = int(ort_baseline.measure(entries[name], repeats, baseline)["rss_bytes"]["median"])
    return figures


# -- tables --------------------------------------------------------------------------------
def _mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def _range(summary: dict[str, float]) -> str:
    return f"{summary['median']:.1f} ({summary['min']:.1f}–{summary['max']:.1f})"


def tables(results: list[dict[str, Any]]) -> str:
    from hyperion.tools.report import markdown_table

    header = ("model", "weights MiB", "cap", "path", "mode", "segments", "accounted MiB", "hyperion RSS MiB",
              "onnxruntime RSS MiB", "≤ cap + 32 MiB", "compile RSS MiB", "built (2nd run)", "fed MiB (2nd run)",
              "hyperion ms", "onnxruntime ms", "ratio")
    rows = []
    for r in results:
        cap = f"{r['fraction']:.0%} = {_mib(r['limit_bytes'])} MiB"
        head = (r["model"], _mib(r["weight_bytes"]), cap, r["path"])
        if r["refused"]:
            rows.append((*head, f"refused: needs {_mib(r['smallest_limit_bytes'])} MiB", "-", "-", "-",
                         _mib(r["ort_rss_bytes"]), "-", _mib(r["compile_rss_bytes"]), "-", "-", "-", "-", "-"))
            continue
        lat = r["latency"]
        rows.append((*head, r["mode"], r["segments"], _mib(r["peak_bytes"]), _mib(r["rss_bytes"]),
                     _mib(r["ort_rss_bytes"]), "yes" if r["within"] else
                     f"**no** (+{_mib(r['rss_bytes'] - r['limit_bytes'] - ALLOWANCE)})",
                     _mib(r["compile_rss_bytes"]), r["built"], _mib(r["fed_bytes"]), _range(lat["hyperion_ms"]),
                     _range(lat["ort_ms"]), f"{lat['ratio']:.2f}x"))
    return markdown_table(header, rows)


def summary_table(results: list[dict[str, Any]]) -> str:
    from hyperion.tools.report import markdown_table

    header = ("cap", "path", "runs", "refused", "within cap + 32 MiB", "latency ratio median (min–max)")
    rows = []
    for fraction in sorted({r["fraction"] for r in results}, reverse=True):
        for path in PATHS:
            group = [r for r in results if r["fraction"] == fraction and r["path"] == path]
            if not group:
                continue
            ran = [r for r in group if not r["refused"]]
            ratios = [r["latency"]["ratio"] for r in ran]
            spread = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}x)" if ratios else "-")
            rows.append((f"{fraction:.0%}", path, len(group), len(group) - len(ran),
                         f"{sum(r['within'] for r in ran)} of {len(ran)}", spread))
    return markdown_table(header, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "corpus" / "models")
    parser.add_argument("--ort-baseline", type=Path, default=REPO / "benchmarks" / "results" / "ort_baseline.json",
                        help="ort_baseline.py's JSON; models it lacks are measured here (default: %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated model names; default every manifest entry")
    parser.add_argument("--fractions", default="1,0.5,0.25", help="caps as fractions of onnxruntime's peak RSS")
    parser.add_argument("--paths", default="default", help="comma-separated capped paths: default, packed, fed")
    parser.add_argument("--repeats", type=int, default=5, help="latency pairs per run (and baseline processes)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of latency pairs per run, at most")
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds before every timed run, for the other side's workers to stop spinning")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "capped.json")
    parser.add_argument("--child", metavar="ARGS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return 0

    import onnxruntime

    import corpus

    entries = corpus.load_manifest(args.corpus)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(wanted) - set(entries):
        parser.error(f"not in the manifest: {sorted(unknown)}")
    entries = {name: entry for name, entry in entries.items() if not wanted or name in wanted}
    fractions = [float(f) for f in args.fractions.split(",")]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if unknown_paths := set(paths) - set(PATHS):
        parser.error(f"--paths: unknown {sorted(unknown_paths)}; choose from {sorted(PATHS)}")
    ort_rss = ort_figures(entries, args.ort_baseline, args.repeats)
    baseline_samples = [_once({"kind": "baseline"})["rss_bytes"] for _ in range(args.repeats)]
    baseline = int(statistics.median(baseline_samples))
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name, entry in entries.items():
        print(f"{name}", file=sys.stderr, flush=True)
        results += measure_model(entry, ort_rss[name], baseline, fractions, args.repeats, args.budget, args.pause,
                                 paths)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "onnxruntime": onnxruntime.__version__,
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "baseline_rss_bytes": baseline,
        "baseline_samples": baseline_samples, "ort_baseline": str(args.ort_baseline),
        "elapsed_s": time.perf_counter() - started, "results": results}, indent=1) + "\n")
    print(f"import-only baseline {_mib(baseline)} MiB; latency: medians (min–max) over up to {args.repeats} "
          f"alternated pairs\n")
    print(tables(results))
    print()
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
