"""Weight and batch streaming against plain onnxruntime: peak RSS and latency.

    python benchmarks/streaming.py [--quick | --fixtures [NAME ...]] [--repeats N] [--model-dir DIR]

Models: a generated 20 x (MatMul 2240x2240 -> Relu) model, 401 MB of external-data
weights (written to a temporary folder, or DIR if given, and reused there), at batch
1, 8, 64 and 256 under a 100 MB cap, with weights fed to sessions built once (memory_opt's
default) and pre-packed in sessions built every run (``prepack_weights=True``), the packed
path at 256 once more with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (see docs/memory.md);
and the fixtures, at batch 1 under the smallest cap memory_opt accepts with its defaults
(``demo`` also at 8, 64 and
256 under 8, 8 and 24 MiB, where adaptive streams the batch once it no longer fits whole).
onnxruntime always runs as installed (pre-packing on).

Peak RSS: each side compiles (or creates its onnxruntime session) and runs once in a
fresh subprocess; the figure is its VmHWM minus that of a process that only imports
hyperion and onnxruntime (SPEC's definition).

Latency: one more subprocess holds both, warms both up, then alternates them in blocks of
runs (as many as take onnxruntime about 20 ms, at least one) and reports medians, so that
load from elsewhere on the machine hits both alike; the CPU milliseconds per run (all
threads) are reported too, as they depend less on that load. Blocks, not single runs:
onnxruntime's idle workers spin after its run (its default), taking a core from whatever
the process runs next -- on a model of 0.01-1 ms, 3-5 times Hyperion's own time. A
prefetch Hyperion leaves running after a run (the first segment, for the next run) is
waited for and charged to Hyperion before onnxruntime's turn. ``--fixtures`` measures only
the fixtures (or those named), and prints each one's spread below the table. ``build``/``wait`` are the
milliseconds per run spent creating sessions (on any thread) and blocked waiting for
one: with prefetch working, wait is below build. Prints Markdown.
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
# demo under caps that make adaptive stream: at batch 256 the input alone is 12 MiB.
DEMO_CAP_BYTES = {8: 8 * 2**20, 64: 8 * 2**20, 256: 24 * 2**20}
BATCHES = (1, 8, 64, 256)
HUGETLB = "glibc.malloc.hugetlb=1"


# -- the measuring children ----------------------------------------------------------------
def _feeds(spec: dict) -> dict:
    import numpy as np

    if spec["fixture"] is None:
        rng = np.random.default_rng(0)
        return {"x": rng.standard_normal((spec["batch"], spec["hidden"])).astype(np.float32)}
    from fixtures import example_feeds

    return example_feeds(spec["fixture"], batch=spec["batch"])


def _onnxruntime(spec: dict, feeds: dict):
    import onnxruntime as ort

    from hyperion.runtime import session_options

    session = ort.InferenceSession(spec["model"], session_options(), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def _hyperion(spec: dict, feeds: dict, prefetch: bool):
    import hyperion

    shapes = {name: list(value.shape) for name, value in feeds.items()}
    return hyperion.compile(spec["model"], memory_limit=spec["cap"], mode=spec["mode"], input_shapes=shapes,
                            prefetch=prefetch, prepack_weights=spec.get("prepack"))


def _rss_child(spec: dict) -> dict:
    import onnxruntime  # noqa: F401  (the baseline imports both)

    import hyperion  # noqa: F401
    from hyperion.tools.rss import peak_rss_bytes

    if spec["kind"] == "baseline":
        return {"rss": peak_rss_bytes()}
    feeds = _feeds(spec)
    if spec["kind"] == "ort":
        _onnxruntime(spec, feeds)()
        return {"rss": peak_rss_bytes()}
    cm = _hyperion(spec, feeds, spec["prefetch"])
    cm.run(feeds)
    schedule = cm.schedule
    return {"rss": peak_rss_bytes(), "mode": schedule.mode, "peak": schedule.peak_bytes,
            "segments": len(schedule.segments), "chunk": schedule.batch_chunk,
            "prefetch": schedule.prefetch}


BLOCK_MS = 20.0     # runs per side in a row: as many as take onnxruntime this long (at least one)


def _latency_child(spec: dict) -> dict:
    feeds = _feeds(spec)
    plain = _onnxruntime(spec, feeds)
    models = {prefetch: _hyperion(spec, feeds, prefetch) for prefetch in (True, False)}
    samples: dict[str, list[float]] = {key: [] for key in ("ort", "True", "False", "ort_cpu", "True_cpu",
                                                           "False_cpu", "build", "wait")}
    warm = []
    for _ in range(3):                                  # warms onnxruntime up, and sizes the blocks
        started = time.perf_counter()
        plain()
        warm.append(1e3 * (time.perf_counter() - started))
    block = max(1, min(50, int(BLOCK_MS / max(min(warm), 1e-3))))
    for repeat in range(spec["repeats"] + 1):          # the first round warms everything up
        for _ in range(block):
            started, cpu = time.perf_counter(), time.process_time()
            plain()
            if repeat:
                samples["ort"].append(1e3 * (time.perf_counter() - started))
                samples["ort_cpu"].append(1e3 * (time.process_time() - cpu))
        for prefetch, cm in models.items():
            for _ in range(block):
                started, cpu = time.perf_counter(), time.process_time()
                cm.run(feeds)
                cm._active()[2].settle()                # its prefetch of the next run is its own cost
                if repeat:
                    samples[str(prefetch)].append(1e3 * (time.perf_counter() - started))
                    samples[f"{prefetch}_cpu"].append(1e3 * (time.process_time() - cpu))
                    if prefetch:
                        samples["build"].append(cm.stats.sessions.build_ms)
                        samples["wait"].append(cm.stats.sessions.wait_ms)
    result = {key: statistics.median(values) for key, values in samples.items()}
    for key in ("ort", "False"):                        # the spread: quartiles
        result[f"{key}_quartiles"] = statistics.quantiles(samples[key], n=4)[::2]
    result["samples"] = len(samples["ort"])
    return result


def _run_child(kind: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **spec.get("env", {})}
    done = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                          text=True, check=False, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table -------------------------------------------------------------------------
def _ms(value: float) -> str:
    """Milliseconds to three significant digits at most (the fixtures run in 0.01-1 ms)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


HEADER = ("| model | batch | mode | cap | prefetch | hyperion ms | onnxruntime ms | latency ratio "
          "| hyperion peak RSS | onnxruntime peak RSS | RSS vs onnxruntime | accounted peak "
          "| session build / wait ms | CPU ms hyperion / onnxruntime |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _row(label: str, spec: dict, rss: dict, ort_rss: dict, latency: dict, baseline: int, prefetch: bool) -> str:
    if "error" in rss or "error" in latency or "error" in ort_rss:
        error = rss.get("error") or latency.get("error") or ort_rss.get("error")
        return f"| {label} | {spec['batch']} | error: {error} |" + " |" * 11
    ours_ms, ort_ms = latency[str(prefetch)], latency["ort"]
    ours, theirs = rss["rss"] - baseline, ort_rss["rss"] - baseline
    mode = rss["mode"] + (f" (chunks of {rss['chunk']})" if rss.get("chunk") else "")
    used = "on" if rss["prefetch"] else ("off" if not prefetch else "off (does not fit)")
    if rss["mode"] == "normal":
        used = "-"   # every session is kept: nothing to prefetch
    sessions = f"{latency['build']:.0f} / {latency['wait']:.0f}" if prefetch else "-"
    return (f"| {label} | {spec['batch']} | {mode} | {_mib(spec['cap'])} | {used} | {_ms(ours_ms)} | {_ms(ort_ms)} "
            f"| {ours_ms / ort_ms:.2f}x | {_mib(ours)} | {_mib(theirs)} | {100 * ours / max(theirs, 1):.0f}% "
            f"| {_mib(rss['peak'])} | {sessions} | {_ms(latency[f'{prefetch}_cpu'])} / {_ms(latency['ort_cpu'])} |")


def smallest_memory_opt_cap(model: Path, fixture: str) -> int:
    import hyperion
    from fixtures import example_feeds

    shapes = {name: value.shape for name, value in example_feeds(fixture).items()}
    try:
        hyperion.compile(model, memory_limit=1, mode="memory_opt", input_shapes=shapes)
    except hyperion.MemoryLimitError as exc:
        return exc.smallest_limit_bytes
    raise AssertionError("a 1-byte cap fitted")


def fixture_cases(names: list[str] | tuple[str, ...]) -> list[tuple[str, dict]]:
    """The fixtures at batch 1 under the smallest cap memory_opt accepts with its defaults."""
    from fixtures import fixture_path

    return [(name, {"model": str(fixture_path(name)), "fixture": name, "batch": 1, "mode": "adaptive",
                    "cap": smallest_memory_opt_cap(fixture_path(name), name)}) for name in names]


def cases(big: Path, quick: bool) -> list[tuple[str, dict]]:
    from fixtures import FIXTURE_NAMES, fixture_path
    from fixtures.streaming_mlp import DEFAULT_HIDDEN

    out = [(label, {"model": str(big), "fixture": None, "hidden": DEFAULT_HIDDEN, "batch": batch,
                    "mode": "memory_opt", "cap": BIG_CAP_BYTES, "prepack": prepack})
           for batch in (BATCHES[::3] if quick else BATCHES)
           for label, prepack in (("mlp 20x20MB, packed", True), ("mlp 20x20MB, fed", None))]
    # glibc backing large blocks with huge pages: far fewer page faults while sessions are created.
    out.append(("mlp 20x20MB, packed, hugetlb", {**out[-2][1], "env": {"GLIBC_TUNABLES": HUGETLB}}))
    out += fixture_cases(("demo",) if quick else FIXTURE_NAMES)
    for batch in (() if quick else BATCHES[1:]):
        out.append(("demo", {"model": str(fixture_path("demo")), "fixture": "demo", "batch": batch,
                             "mode": "adaptive", "cap": DEMO_CAP_BYTES[batch]}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer rows (the big model at batch 1 and 256, demo)")
    parser.add_argument("--fixtures", nargs="*", metavar="NAME",
                        help="only the fixtures (all, or those named) at the smallest cap, with their spread")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, help="where the 401 MB model is (or is written)")
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps(_latency_child(spec) if kind == "latency" else _rss_child(spec)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.fixtures is not None:
            from fixtures import FIXTURE_NAMES

            rows = fixture_cases(args.fixtures or FIXTURE_NAMES)
        else:
            folder = args.model_dir or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            from fixtures.streaming_mlp import streaming_mlp_in

            rows = cases(streaming_mlp_in(folder), args.quick)
        baseline = _run_child("rss", {"kind": "baseline"})["rss"]
        print(f"baseline (import hyperion + onnxruntime): {_mib(baseline)}; {os.cpu_count()} CPUs; "
              f"load average before: {os.getloadavg()[0]:.1f}\n")
        print(HEADER)
        spreads = []
        for label, spec in rows:
            spec = {**spec, "repeats": args.repeats}
            ort_rss = _run_child("rss", {**spec, "kind": "ort", "env": {}})   # plain onnxruntime as installed
            latency = _run_child("latency", spec)
            for prefetch in (True, False):
                rss = _run_child("rss", {**spec, "kind": "hyperion", "prefetch": prefetch})
                print(_row(label, spec, rss, ort_rss, latency, baseline, prefetch), flush=True)
            if "error" not in latency:
                spreads.append(_spread(label, latency))
        if args.fixtures is not None:
            print("\n| fixture | runs per side | hyperion ms, prefetch off: median (quartiles) "
                  "| onnxruntime ms: median (quartiles) | latency ratio |\n|---|---|---|---|---|")
            print("\n".join(spreads))
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")


def _spread(label: str, latency: dict) -> str:
    ours, theirs = latency["False_quartiles"], latency["ort_quartiles"]
    return (f"| {label} | {latency['samples']} | {_ms(latency['False'])} ({_ms(ours[0])}-{_ms(ours[1])}) "
            f"| {_ms(latency['ort'])} ({_ms(theirs[0])}-{_ms(theirs[1])}) | {latency['False'] / latency['ort']:.1f}x |")


if __name__ == "__main__":
    main()
