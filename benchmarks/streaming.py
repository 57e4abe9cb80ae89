"""Weight and batch streaming against plain onnxruntime: peak RSS and latency.

    python benchmarks/streaming.py [--quick] [--repeats N] [--model-dir DIR]

Models: a generated 20 x (MatMul 2240x2240 -> Relu) model, 401 MB of external-data
weights (written to a temporary folder, or DIR if given, and reused there), at batch
1, 8, 64 and 256 under a 100 MB cap; and the fixtures, at batch 1 under the smallest
cap memory_opt accepts (``demo`` also at 8, 64 and 256 under 8 MB, where adaptive
streams the batch).

Every figure comes from its own fresh subprocess: the model is compiled (or the
onnxruntime session created), run once to warm up, then timed over ``repeats`` runs
(the median is reported); peak RSS is the process's VmHWM minus that of a process that
only imports hyperion and onnxruntime (SPEC's definition). ``build``/``wait`` are the
milliseconds per run spent creating onnxruntime sessions (on any thread) and blocked
waiting for one: with prefetch working, wait is well below build. Prints Markdown.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BIG_CAP_BYTES = 100 * 10**6
BATCHES = (1, 8, 64, 256)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# -- the measuring child -----------------------------------------------------------------
def _feeds(spec: dict) -> dict:
    import numpy as np

    if spec["fixture"] is None:
        rng = np.random.default_rng(0)
        return {"x": rng.standard_normal((spec["batch"], spec["hidden"])).astype(np.float32)}
    from fixtures import example_feeds

    return example_feeds(spec["fixture"], batch=spec["batch"])


def _child(spec: dict) -> dict:
    import hyperion  # noqa: F401  (the baseline imports both)
    import onnxruntime as ort

    if spec["kind"] == "baseline":
        return {"rss": _peak_rss_bytes()}
    feeds = _feeds(spec)
    result: dict = {}
    if spec["kind"] == "ort":
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(spec["model"], options, providers=["CPUExecutionProvider"])
        run = lambda: session.run(None, feeds)  # noqa: E731
    else:
        shapes = {name: list(value.shape) for name, value in feeds.items()}
        cm = hyperion.compile(spec["model"], memory_limit=spec["cap"], mode=spec["mode"], input_shapes=shapes,
                              prefetch=spec["prefetch"])
        run = lambda: cm.run(feeds)  # noqa: E731
        result.update(mode=cm.schedule.mode, peak=cm.schedule.peak_bytes, segments=len(cm.schedule.segments),
                      chunk=cm.schedule.batch_chunk, prefetch=cm.schedule.extra.get("prefetch", False))
    run()
    times, build, wait = [], [], []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
        if spec["kind"] != "ort":
            build.append(cm.stats.sessions.build_ms)
            wait.append(cm.stats.sessions.wait_ms)
    result.update(rss=_peak_rss_bytes(), ms=1e3 * statistics.median(times))
    if build:
        result.update(build_ms=statistics.median(build), wait_ms=statistics.median(wait))
    return result


def _runnable_tasks() -> int:
    with open("/proc/loadavg") as loadavg:
        return int(loadavg.read().split()[3].split("/")[0])


def wait_for_quiet(max_wait_s: float, samples: int = 4) -> bool:
    """Wait until at most one other task is runnable for ``samples`` checks in a row (the
    machine is shared); False if it never got quiet within ``max_wait_s``."""
    deadline, quiet = time.monotonic() + max_wait_s, 0
    while quiet < samples:
        if time.monotonic() > deadline:
            return False
        quiet = quiet + 1 if _runnable_tasks() <= 2 else 0
        time.sleep(0.25)
    return True


def measure(spec: dict, max_wait_s: float = 0.0) -> dict:
    if max_wait_s and not wait_for_quiet(max_wait_s):
        print(f"<!-- the machine stayed busy: {spec.get('kind')} {spec.get('model', '')} batch "
              f"{spec.get('batch')} measured anyway -->", flush=True)
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table -------------------------------------------------------------------------
def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _row(label: str, batch: int, cap: int | None, ort: dict, ours: dict, baseline: int, prefetch: bool) -> str:
    if "error" in ours:
        return f"| {label} | {batch} | - | {_mib(cap)} | {'on' if prefetch else 'off'} | {ours['error']} |" + " |" * 8
    ratio = ours["ms"] / ort["ms"]
    rss, ort_rss = ours["rss"] - baseline, ort["rss"] - baseline
    mode = ours["mode"] + (f" (chunks of {ours['chunk']})" if ours.get("chunk") else "")
    pf = "on" if ours.get("prefetch") else ("off" if not prefetch else "off (does not fit)")
    sessions = f"{ours['build_ms']:.0f} / {ours['wait_ms']:.0f}" if "build_ms" in ours else "-"
    return (f"| {label} | {batch} | {mode} | {_mib(cap)} | {pf} | {ours['ms']:.1f} | {ort['ms']:.1f} | "
            f"{ratio:.2f}x | {_mib(rss)} | {_mib(ort_rss)} | {100 * rss / max(ort_rss, 1):.0f}% | "
            f"{_mib(ours['peak'])} | {sessions} |")


HEADER = ("| model | batch | mode | cap | prefetch | hyperion ms | onnxruntime ms | latency ratio | hyperion peak RSS "
          "| onnxruntime peak RSS | RSS vs onnxruntime | accounted peak | session build / wait ms |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def smallest_memory_opt_cap(model: Path, fixture: str) -> int:
    import hyperion
    from fixtures import example_feeds

    shapes = {name: value.shape for name, value in example_feeds(fixture).items()}
    try:
        hyperion.compile(model, memory_limit=1, mode="memory_opt", input_shapes=shapes)
    except hyperion.MemoryLimitError as exc:
        return exc.smallest_limit_bytes
    raise AssertionError("a 1-byte cap fitted")


def cases(big: Path, quick: bool) -> list[tuple[str, dict, int | None]]:
    """(label, spec without kind/prefetch/repeats, cap) for every row group."""
    from fixtures import FIXTURE_NAMES, fixture_path
    from fixtures.streaming_mlp import DEFAULT_HIDDEN

    out = [("mlp 20x20MB", {"model": str(big), "fixture": None, "hidden": DEFAULT_HIDDEN, "batch": b,
                            "mode": "memory_opt", "cap": BIG_CAP_BYTES}, BIG_CAP_BYTES)
           for b in (BATCHES[:2] if quick else BATCHES)]
    for name in (("demo",) if quick else FIXTURE_NAMES):
        path = fixture_path(name)
        cap = smallest_memory_opt_cap(path, name)
        out.append((name, {"model": str(path), "fixture": name, "batch": 1, "mode": "adaptive", "cap": cap}, cap))
    for batch in (() if quick else BATCHES[1:]):
        out.append(("demo", {"model": str(fixture_path("demo")), "fixture": "demo", "batch": batch,
                             "mode": "adaptive", "cap": 8 * 2**20}, 8 * 2**20))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer rows (batches 1 and 8, demo only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, help="where the 401 MB model is (or is written)")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="seconds to wait for a quiet machine before each measurement (0: never)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        big = folder / "streaming_mlp.onnx"
        if not big.exists():
            from fixtures.streaming_mlp import build_streaming_mlp

            build_streaming_mlp(big)
        baseline = measure({"kind": "baseline"}, args.max_wait)["rss"]
        print(f"baseline (import hyperion + onnxruntime): {_mib(baseline)}; load average before: "
              f"{os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs\n")
        print(HEADER)
        for label, spec, cap in cases(big, args.quick):
            base = {**spec, "repeats": args.repeats}
            ort = measure({**base, "kind": "ort"}, args.max_wait)
            for prefetch in (True, False):
                ours = measure({**base, "kind": "hyperion", "prefetch": prefetch}, args.max_wait)
                print(_row(label, spec["batch"], cap, ort, ours, baseline, prefetch), flush=True)
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
