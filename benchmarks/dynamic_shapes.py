"""Data-dependent sizes under a cap: one model per construct (fixtures/dynamic_shapes.py).

For every fixture and each of its caps (tests/test_replan.py's: one at which the upper
bounds fit, one at which the model is re-planned at run time), in this process:

* how it was planned (``bounded``: the whole model with upper bounds; ``re-planned``: the
  prefix, the rest at run time) and the plans the first run made, with their time (import
  of the rest + passes, ``ReplanStats.replan_ms``);
* the first run's time, and the median (min-max) of ``--repeats`` further runs, against
  plain onnxruntime's median on the same inputs (runs alternate, one side at a time);
* the accounted peak against the cap.

Prints a Markdown table (docs/dynamic_shapes.md shows one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hyperion  # noqa: E402
from fixtures.dynamic_shapes import BUILDERS, dynamic_feeds  # noqa: E402
from hyperion.tools.report import spread  # noqa: E402
from hyperion.units import format_size, parse_size  # noqa: E402
from tests.test_replan import BUILD_ARGS, CASES  # noqa: E402


def _ms(run: Any) -> float:
    started = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - started)


def measure(name: str, cap: str, repeats: int) -> dict[str, Any]:
    model = BUILDERS[name](*BUILD_ARGS.get(name, ()))
    feeds = dynamic_feeds(name)
    cm = hyperion.compile(model, memory_limit=cap)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    first_ms = _ms(lambda: cm.run(feeds))
    replans = cm.replans
    plans = 0 if replans is None else replans.last_run_plans
    replan_ms = 0.0 if replans is None else sum(replans.replan_ms)
    session.run(None, feeds)  # warm-up
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_ms(lambda: cm.run(feeds)))
        theirs.append(_ms(lambda: session.run(None, feeds)))
    assert replans is None or replans.plans_made == plans  # later runs planned nothing
    return {"name": name, "cap": cap, "how": "re-planned" if cm.schedule.replan else "bounded", "plans": plans,
            "replan_ms": replan_ms, "first_ms": first_ms, "ours": ours, "ort": theirs,
            "peak": cm.stats.peak_bytes}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print("| fixture | cap | planned | plans made by the first run | re-plan ms | first run ms | "
          "run ms (median, min-max) | onnxruntime ms | accounted peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (bounded_cap, replan_cap, _) in CASES.items():
        caps = [c for c in dict.fromkeys([bounded_cap, replan_cap]) if c is not None]
        for cap in caps:
            row = measure(name, cap, args.repeats)
            print(f"| {name} | {cap} | {row['how']} | {row['plans']} | {row['replan_ms']:.1f} | "
                  f"{row['first_ms']:.1f} | {spread(row['ours'])} | {spread(row['ort'])} | "
                  f"{format_size(row['peak'])} of {format_size(parse_size(cap) or 0)} |")


if __name__ == "__main__":
    main()
