"""Traces of re-planned runs: what each part of a run takes, read from the trace itself.

For every fixture of fixtures/dynamic_shapes.py that tests/test_replan.py re-plans at
run time (at its re-planned cap), ``--repeats`` runs in one ``cm.tracing(...)`` block:
the first plans the rest (the ``re-plan`` span: a cache miss, with the rest imported and
planned inside it), the others reuse it (hits). From the trace's spans: the first run's
re-plan, import and plan; then the median (min-max) of the later runs' ``prefix``,
``re-plan`` and ``rest`` spans and of the whole ``run`` span, next to the median of as
many untraced runs of the same model (what tracing itself costs: onnxruntime's profiler
and the recorder). Prints a Markdown table (docs/looking.md shows one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hyperion  # noqa: E402
from fixtures.dynamic_shapes import BUILDERS, dynamic_feeds  # noqa: E402
from hyperion.runtime.trace import RUN_TRACK  # noqa: E402
from hyperion.tools.report import spread  # noqa: E402
from tests.test_replan import BUILD_ARGS, CASES  # noqa: E402


def _run_spans(trace: dict[str, Any]) -> list[dict[str, float]]:
    """Per run, in order: the duration (ms) of the run and of its top-level parts."""
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    spans = sorted((e for e in trace["traceEvents"] if e["ph"] == "X" and names[e["tid"]] == RUN_TRACK),
                   key=lambda e: e["ts"])
    runs: list[dict[str, float]] = []
    for span in spans:
        if span["cat"] == "run":
            runs.append({"run": span["dur"] / 1e3})
        elif span["name"] in ("prefix", "re-plan", "import the rest", "plan the rest") or \
                span["name"].startswith("rest "):
            runs[-1]["rest" if span["name"].startswith("rest ") else span["name"]] = span["dur"] / 1e3
    return runs


def measure(name: str, cap: str, repeats: int) -> dict[str, Any]:
    model = BUILDERS[name](*BUILD_ARGS.get(name, ()))
    feeds = dynamic_feeds(name)
    cm = hyperion.compile(model, memory_limit=cap)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "runs.json"
        with cm.tracing(path) as tracing:
            for _ in range(repeats + 1):
                cm.run(feeds)
        trace = tracing.trace
    assert trace is not None
    runs = _run_spans(trace)
    untraced = []
    for _ in range(repeats):
        started = time.perf_counter()
        cm.run(feeds)
        untraced.append(1e3 * (time.perf_counter() - started))
    return {"name": name, "cap": cap, "first": runs[0], "later": runs[1:], "untraced": untraced}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print("| fixture | cap | first run: re-plan ms (import + plan) | prefix ms | re-plan ms (hit) | rest ms "
          "| traced run ms | untraced run ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, cap, _) in CASES.items():
        if hyperion.compile(BUILDERS[name](*BUILD_ARGS.get(name, ())), memory_limit=cap).schedule.replan is None:
            continue
        result = measure(name, cap, args.repeats)
        first, later = result["first"], result["later"]
        miss = (f"{first.get('re-plan', 0.0):.1f} ({first.get('import the rest', 0.0):.1f} + "
                f"{first.get('plan the rest', 0.0):.1f})")
        column = {part: [run[part] for run in later if part in run] for part in ("prefix", "re-plan", "rest", "run")}
        print(f"| {name} | {cap} | {miss} | {spread(column['prefix'])} | {spread(column['re-plan'])} | "
              f"{spread(column['rest'])} | {spread(column['run'])} | {spread(result['untraced'])} |", flush=True)


if __name__ == "__main__":
    main()
