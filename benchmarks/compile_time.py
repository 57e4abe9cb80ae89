"""Compile time of every pass on a synthetic transformer of 2,000 and 20,000 nodes.

The graph is :func:`fixtures.irregular.transformer` (34 nodes a layer), imported once;
then ``hyperion.planner.run_passes`` — classify_edges, order, liveness, plan_memory,
segment, the IR verified after each — runs ``--repeats`` times per mode and the fastest
run is reported (other processes only ever add time). Per-pass times come from the pass
manager's own log records. The targets: 20,000 nodes in at most 3 s, and a 20k/2k ratio of
at most 15 (near-linear).

    python benchmarks/compile_time.py
    python benchmarks/compile_time.py --nodes 2000 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.irregular import NODES_PER_LAYER, transformer  # noqa: E402
from hyperion.frontend import ImportedModel, import_model, load_source  # noqa: E402
from hyperion.ir import ExecutionMode  # noqa: E402
from hyperion.planner import run_passes  # noqa: E402
from hyperion.tools.report import markdown_table  # noqa: E402

TARGET_SECONDS = 3.0
TARGET_RATIO = 15.0
PASSES = ("classify_edges", "order", "liveness", "plan_memory", "segment")


class PassTimes(logging.Handler):
    """Collects the pass manager's ``pass <name>: <ms> ms`` debug records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.ms: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("pass %s") and len(record.args) >= 2:
            self.ms[str(record.args[0])] = float(record.args[1])


def timed_run(imported: ImportedModel, mode: ExecutionMode) -> tuple[float, dict[str, float]]:
    """(seconds for all passes, milliseconds per pass) of one run."""
    handler = PassTimes()
    logger = logging.getLogger("hyperion.passes")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        started = time.perf_counter()
        run_passes(imported, mode, None)
        return time.perf_counter() - started, handler.ms
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def measure(nodes: int, mode: ExecutionMode, repeats: int) -> dict[str, object]:
    started = time.perf_counter()
    imported = import_model(load_source(transformer(max(1, nodes // NODES_PER_LAYER))))
    import_s = time.perf_counter() - started
    runs = [timed_run(imported, mode) for _ in range(repeats)]
    total, per_pass = min(runs, key=lambda run: run[0])
    return {"nodes": len(imported.graph.nodes), "mode": mode.value, "import_s": import_s, "total_s": total,
            "per_pass": per_pass}


def table(rows: list[dict[str, object]]) -> str:
    header = ("nodes", "mode", "import s", "all passes s", *(f"{p} ms" for p in PASSES))
    return markdown_table(header, (
        (row["nodes"], row["mode"], f"{row['import_s']:.2f}", f"{row['total_s']:.2f}",
         *(f"{row['per_pass'].get(p, float('nan')):.0f}" for p in PASSES))  # type: ignore[union-attr]
        for row in rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs=2, default=[2000, 20000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["memory_opt", "normal"])
    args = parser.parse_args()
    rows, verdicts = [], []
    for mode in (ExecutionMode(m) for m in args.modes):
        small, large = (measure(n, mode, args.repeats) for n in args.nodes)
        rows += [small, large]
        ratio = large["total_s"] / small["total_s"]  # type: ignore[operator]
        ok = large["total_s"] <= TARGET_SECONDS and ratio <= TARGET_RATIO  # type: ignore[operator]
        verdicts.append(f"{mode.value}: {large['nodes']} nodes in {large['total_s']:.2f} s "
                        f"(target <= {TARGET_SECONDS:.0f} s), {large['nodes']}/{small['nodes']} ratio {ratio:.1f} "
                        f"(target <= {TARGET_RATIO:.0f}): {'ok' if ok else 'MISSED'}")
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}, "
          f"fastest of {args.repeats} runs\n")
    print(table(rows))
    print()
    print("\n".join(verdicts))
    return 0 if all(v.endswith("ok") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
