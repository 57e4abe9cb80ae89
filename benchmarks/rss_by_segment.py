"""Where a capped run's RSS goes: measured peak RSS per segment against the plan's bytes.

A fresh subprocess compiles a corpus model under a cap (a fraction of plain onnxruntime's
RSS, from ort_baseline.py's JSON), runs it once, then runs it again resetting its high-water
mark (``/proc/self/clear_refs``, 5) before each segment and reading VmHWM after it. Per
segment: the plan's bytes (the most over its steps), the measured peak over the import-only
baseline, and the difference — what the plan does not count: onnxruntime's kernel workspace
(Conv im2col, layout copies), allocator slack, the code and bookkeeping the 32 MiB allowance
is for. ``--max-segment-steps 1`` puts every node in its own segment, so the difference is per
node, summed up per op type at the end (the most, and where).

    python benchmarks/rss_by_segment.py resnet50 --fraction 0.25 [--fed] [--max-segment-steps 1] \
        [--corpus DIR] [--ort-baseline FILE] [--top 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MIB = 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _child(args: dict[str, Any]) -> dict[str, Any]:
    import numpy  # noqa: F401  (the baseline imports what the measurement does)
    import onnxruntime  # noqa: F401

    import corpus
    import hyperion

    if args["kind"] == "baseline":
        return {"rss": _status("VmHWM")}
    entry = args["entry"]
    cm = hyperion.compile(entry["path"], memory_limit=args["limit"], prepack_weights=not args["fed"],
                          max_segment_steps=args["max_segment_steps"])
    compile_peak = _status("VmHWM")
    feeds = corpus.feeds(entry, seed=0)
    cm.run(feeds)
    floor = _status("VmRSS")
    peaks: list[int] = []

    def after_segment(done: int, total: int) -> None:
        peaks.append(_status("VmHWM"))
        _reset_peak()

    _reset_peak()
    cm.run(feeds, after_segment)
    schedule = cm.schedule
    segments = []
    for segment, peak in zip(schedule.segments, peaks, strict=False):
        steps = [schedule.steps[i] for i in segment.steps]
        segments.append({"index": segment.index, "ops": [s.op_type for s in steps],
                         "nodes": [s.node for s in steps], "planned": max(s.live_bytes for s in steps),
                         "measured": peak, "weights": sum(schedule.tensors[w].bytes or 0 for w in segment.weights)})
    return {"mode": str(schedule.mode), "peak_bytes": schedule.peak_bytes, "compile_peak": compile_peak,
            "floor": floor, "segments": segments}


def _spawn(args: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--fed", action="store_true", help="prepack_weights=False (default: packed)")
    parser.add_argument("--max-segment-steps", type=int)
    parser.add_argument("--corpus", type=Path, default=REPO / "corpus" / "models")
    parser.add_argument("--ort-baseline", type=Path, default=REPO / "benchmarks" / "results" / "ort_baseline.json")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    import corpus

    entry = corpus.load_manifest(args.corpus)[args.model]
    ort_rss = int(json.loads(args.ort_baseline.read_text())["models"][args.model]["rss_bytes"]["median"])
    limit = int(args.fraction * ort_rss)
    baseline = int(statistics.median(_spawn({"kind": "baseline"})["rss"] for _ in range(3)))
    r = _spawn({"kind": "run", "entry": entry, "limit": limit, "fed": args.fed,
                "max_segment_steps": args.max_segment_steps})
    worst = max(s["measured"] - baseline for s in r["segments"])
    print(f"{args.model} at {args.fraction:.0%} = {limit / MIB:.1f} MiB, {'fed' if args.fed else 'packed'}, "
          f"{r['mode']}, {len(r['segments'])} segments; plan peak {r['peak_bytes'] / MIB:.1f} MiB; "
          f"over the baseline ({baseline / MIB:.1f} MiB): compile peak {(r['compile_peak'] - baseline) / MIB:.1f}, "
          f"resident before the run {(r['floor'] - baseline) / MIB:.1f}, worst segment {worst / MIB:.1f} MiB "
          f"(cap + 32 MiB = {(limit + 32 * MIB) / MIB:.1f})\n")
    rows = sorted(r["segments"], key=lambda s: s["measured"] - s["planned"], reverse=True)
    print("| segment | ops | weights MiB | planned MiB | measured MiB | measured − planned MiB |")
    print("|---|---|---|---|---|---|")
    for s in rows[:args.top]:
        ops = ", ".join(f"{op}×{s['ops'].count(op)}" for op in sorted(set(s["ops"])))
        print(f"| {s['index']} ({s['nodes'][0]}) | {ops[:80]} | {s['weights'] / MIB:.1f} | {s['planned'] / MIB:.1f} | "
              f"{(s['measured'] - baseline) / MIB:.1f} | {(s['measured'] - baseline - s['planned']) / MIB:.1f} |")
    by_op: dict[str, list[float]] = {}
    for s in r["segments"]:
        for op in set(s["ops"]):
            by_op.setdefault(op, []).append((s["measured"] - baseline - s["planned"]) / MIB)
    print("\n| op type (in segment) | segments | measured − planned MiB: median | most |\n|---|---|---|---|")
    for op, values in sorted(by_op.items(), key=lambda kv: -max(kv[1])):
        print(f"| {op} | {len(values)} | {statistics.median(values):.1f} | {max(values):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
