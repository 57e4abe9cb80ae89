"""Plain onnxruntime on every corpus model: the 100% figures the capped benchmark compares against.

For each manifest entry, ``--repeats`` fresh subprocesses each import onnxruntime and numpy,
read the entry's feeds (written once by the parent with ``corpus.save_feeds``), create an
InferenceSession (CPU, ``intra_op_num_threads`` = 2, all else default), run it once and read
their peak RSS (VmHWM), then time ``--repeats`` further runs.
Peak RSS is reported above the median VmHWM of subprocesses that only import the same modules
(SPEC's definition, with plain onnxruntime in place of Hyperion). Figures are medians with their
min-max spread; the table is printed as Markdown and written, with every sample, to
benchmarks/results/ort_baseline.json.

    make corpus && python benchmarks/ort_baseline.py [--corpus corpus/models] [--only resnet50,bert_base]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ort_baseline.json"
THREADS = 2
MIB = 2**20


def _peak_rss_bytes() -> int:
    """hyperion.tools.rss.peak_rss_bytes, loaded from its file: importing it as
    ``hyperion.tools.rss`` runs hyperion/__init__ (about 30 MiB more), which has no place in a
    figure for plain onnxruntime."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_rss", REPO / "hyperion" / "tools" / "rss.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_rss_bytes()


def _child(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """One fresh process's measurement; ``baseline`` only imports what the others import."""
    import numpy as np  # noqa: F401  (part of the baseline)
    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    import corpus

    if kind == "baseline":
        return {"rss_bytes": _peak_rss_bytes()}
    entry = args["entry"]
    feeds = corpus.load_feeds(args["feeds"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    t0 = time.perf_counter()
    session = ort.InferenceSession(entry["path"], options, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    session.run(None, feeds)
    t2 = time.perf_counter()
    rss_once = _peak_rss_bytes()  # the figure: a session created and run once
    runs = []
    for _ in range(args["runs"]):
        started = time.perf_counter()
        session.run(None, feeds)
        runs.append(time.perf_counter() - started)
    return {"rss_bytes": rss_once, "rss_after_runs_bytes": _peak_rss_bytes(), "create_s": t1 - t0,
            "first_run_s": t2 - t1, "runs_s": runs}


def _spawn(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def measure(entry: dict[str, Any], repeats: int, baseline: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import corpus

    with tempfile.TemporaryDirectory(prefix="hyperion-feeds-") as folder:
        feeds = str(corpus.save_feeds(entry, Path(folder) / "feeds.npz"))
        children = [_spawn("ort", {"entry": entry, "runs": repeats, "feeds": feeds}) for _ in range(repeats)]
    rss = [c["rss_bytes"] - baseline for c in children]
    return {
        "family": entry["family"], "weight_bytes": entry["weight_bytes"], "nodes": entry["nodes"],
        "rss_bytes": _summary(rss),
        "rss_after_runs_bytes": _summary([c["rss_after_runs_bytes"] - baseline for c in children]),
        "create_ms": _summary([1e3 * c["create_s"] for c in children]),
        "first_run_ms": _summary([1e3 * c["first_run_s"] for c in children]),
        "run_ms": _summary([1e3 * s for c in children for s in c["runs_s"]]),
        "samples": children,
    }


def _cell(summary: dict[str, float], scale: float = 1.0, digits: int = 0) -> str:
    return (f"{summary['median'] / scale:.{digits}f} "
            f"({summary['min'] / scale:.{digits}f}–{summary['max'] / scale:.{digits}f})")


def markdown(models: dict[str, dict[str, Any]]) -> str:
    rows = ["| model | family | weights MiB | peak RSS over baseline MiB | RSS / weights | session create ms "
            "| first run ms | run ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in models.items():
        ratio = m["rss_bytes"]["median"] / max(m["weight_bytes"], 1)
        rows.append(f"| {name} | {m['family']} | {m['weight_bytes'] / MIB:.1f} | {_cell(m['rss_bytes'], MIB)} | "
                    f"{ratio:.2f} | {_cell(m['create_ms'])} | {_cell(m['first_run_ms'])} | "
                    f"{_cell(m['run_ms'], digits=1)} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "corpus" / "models")
    parser.add_argument("--only", default="", help="comma-separated model names; default every manifest entry")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per model, and timed runs in each")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], json.loads(args.child[1]))))
        return 0

    sys.path.insert(0, str(REPO))
    import onnxruntime

    import corpus

    entries = corpus.load_manifest(args.corpus)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(wanted) - set(entries):
        parser.error(f"not in the manifest: {sorted(unknown)}")
    baseline_samples = [_spawn("baseline", {})["rss_bytes"] for _ in range(args.repeats)]
    baseline = int(statistics.median(baseline_samples))
    models: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        if wanted and name not in wanted:
            continue
        print(f"measuring {name}", file=sys.stderr, flush=True)
        models[name] = measure(entry, args.repeats, baseline)

    # A subset (--only) updates its models in the results file and keeps the others.
    previous = json.loads(RESULTS.read_text())["models"] if RESULTS.exists() and wanted else {}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "intra_op_num_threads": THREADS, "repeats": args.repeats, "baseline_rss_bytes": baseline,
        "baseline_samples": baseline_samples, "models": previous | models,
    }, indent=1) + "\n")
    print(f"import-only baseline: {baseline / MIB:.1f} MiB; medians (min–max) over {args.repeats} fresh processes, "
          f"runs over {args.repeats}x{args.repeats}\n")
    print(markdown(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
