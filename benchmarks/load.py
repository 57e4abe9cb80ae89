"""``hyperion.load`` of a saved schedule against ``hyperion.compile``: wall time and peak RSS.

    python benchmarks/load.py [--repeats N] [--model-dir DIR] [--quick]

Models: the demo fixture (uncapped, and memory_opt under 1.5 MB) and a generated
20 x (MatMul 2240x2240 -> Relu) model with 401 MB of external-data weights (written to a
temporary folder, or DIR if given, and reused there; never to the repository), uncapped
and memory_opt under a 100 MB cap. ``--quick`` skips the large model.

Each figure comes from a fresh subprocess that imports hyperion, then either compiles the
model (import, shape inference, passes, planning) or loads the schedule the parent saved
(``hyperion.load``: the model's nodes and the schedule, nothing else), then runs it once.
Time: wall milliseconds of ``compile`` / ``load`` alone, and of the first run after it
(sessions are created there), medians over the repeats. Peak RSS: the child's VmHWM after
``compile`` / ``load`` and after the run, minus that of a process that only imports
hyperion and onnxruntime (SPEC's definition). Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BIG_CAP_BYTES = 100 * 10**6
DEMO_CAP = "1.5MB"


# -- the measuring child ---------------------------------------------------------------------
def _feeds(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    if spec["name"] == "demo":
        from fixtures import example_feeds

        return example_feeds("demo")
    return {"x": np.random.default_rng(0).standard_normal((1, spec["hidden"])).astype(np.float32)}


def _child(kind: str, spec: dict[str, Any]) -> dict[str, float]:
    import hyperion
    from hyperion.tools.bench import peak_rss_bytes

    if kind == "baseline":
        import onnxruntime  # noqa: F401  (the baseline imports both)

        return {"rss": peak_rss_bytes()}
    feeds = _feeds(spec)
    started = time.perf_counter()
    if kind == "compile":
        cm = hyperion.compile(spec["model"], memory_limit=spec["cap"], mode=spec["mode"],
                              input_shapes={k: list(v.shape) for k, v in feeds.items()})
    else:
        cm = hyperion.load(spec["model"], spec["schedule"])
    prepared = time.perf_counter()
    prepare_rss = peak_rss_bytes()
    cm.run(feeds)
    return {"prepare_ms": 1e3 * (prepared - started), "prepare_rss": prepare_rss,
            "run_ms": 1e3 * (time.perf_counter() - prepared), "run_rss": peak_rss_bytes(),
            "segments": len(cm.schedule.segments), "mode": str(cm.schedule.mode)}


def _measure(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                          text=True, check=False, cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} of {spec['name']} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the parent -------------------------------------------------------------------------------
def _save_schedule(spec: dict[str, Any], folder: Path) -> str:
    import hyperion

    feeds = _feeds(spec)
    cm = hyperion.compile(spec["model"], memory_limit=spec["cap"], mode=spec["mode"],
                          input_shapes={k: list(v.shape) for k, v in feeds.items()})
    path = folder / f"{spec['name']}-{spec['cap']}.schedule.json"
    return str(cm.schedule.save(path))


def _row(spec: dict[str, Any], repeats: int, baseline: int) -> list[str]:
    results = {kind: [_measure(kind, spec) for _ in range(repeats)] for kind in ("compile", "load")}

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    def mib(kind: str, key: str) -> str:
        return f"{(median(kind, key) - baseline) / 2**20:.1f}"

    first = results["load"][0]
    cap = "none" if spec["cap"] is None else spec["label"]
    return [spec["name"], cap, f"{first['mode']} ({first['segments']} seg.)",
            f"{median('compile', 'prepare_ms'):.1f}", f"{median('load', 'prepare_ms'):.1f}",
            f"{median('compile', 'run_ms'):.1f}", f"{median('load', 'run_ms'):.1f}",
            mib("compile", "prepare_rss"), mib("load", "prepare_rss"),
            mib("compile", "run_rss"), mib("load", "run_rss")]


def _specs(model_dir: Path, quick: bool) -> list[dict[str, Any]]:
    from fixtures import fixture_path

    demo = str(fixture_path("demo"))
    specs = [{"name": "demo", "model": demo, "cap": None, "mode": "adaptive"},
             {"name": "demo", "model": demo, "cap": DEMO_CAP, "label": DEMO_CAP, "mode": "memory_opt"}]
    if quick:
        return specs
    from fixtures.streaming_mlp import DEFAULT_HIDDEN, streaming_mlp_in

    big = streaming_mlp_in(model_dir)
    common = {"name": "streaming_mlp (401 MB)", "model": str(big), "hidden": DEFAULT_HIDDEN}
    return specs + [{**common, "cap": None, "mode": "adaptive"},
                    {**common, "cap": BIG_CAP_BYTES, "label": "100 MB", "mode": "memory_opt"}]


HEADER = ("model", "cap", "mode", "compile ms", "load ms", "first run ms after compile", "after load",
          "peak RSS after compile MiB", "after load MiB", "peak RSS compile + run MiB", "load + run MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, help="where the 401 MB model is written (and reused)")
    parser.add_argument("--quick", action="store_true", help="the demo model only")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], json.loads(args.child[1]))))
        return 0
    from hyperion.tools.report import markdown_table

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp)
        model_dir.mkdir(parents=True, exist_ok=True)
        baseline = int(statistics.median(_measure("baseline", {"name": "baseline"})["rss"]
                                         for _ in range(args.repeats)))
        rows = []
        for spec in _specs(model_dir, args.quick):
            spec["schedule"] = _save_schedule(spec, Path(tmp))
            rows.append(_row(spec, args.repeats, baseline))
    print(markdown_table(HEADER, rows))
    print(f"\nbaseline (import hyperion + onnxruntime): {baseline / 2**20:.1f} MiB; medians of {args.repeats} "
          "fresh processes each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
