"""Hyperion next to plain onnxruntime on every fixture (or the models given).

For each model: no cap, and a cap at half the uncapped accounted peak (or the
smallest feasible cap when half cannot be met). Latency is the median of
interleaved runs in this process with the same thread settings; peak RSS is
measured in fresh subprocesses, minus an import-only baseline (SPEC).

    python benchmarks/compare.py                 # every fixture
    python benchmarks/compare.py model.onnx ...  # your models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hyperion  # noqa: E402
from fixtures import FIXTURE_NAMES, fixture_path  # noqa: E402
from hyperion.tools.bench import bench_model, markdown_table  # noqa: E402
from hyperion.tools.feeds import input_shapes_of  # noqa: E402


def half_peak_cap(model: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    peak = hyperion.compile(model, input_shapes=shapes).schedule.peak_bytes
    try:
        hyperion.compile(model, memory_limit=peak // 2, input_shapes=shapes)
        return peak // 2
    except hyperion.MemoryLimitError as exc:
        return exc.smallest_limit_bytes


def concrete_shapes(model: Path) -> dict[str, tuple[int, ...]]:
    """Declared input shapes with symbolic dims bound to 1."""
    return input_shapes_of(hyperion.compile(model).base_ir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-rss", action="store_true")
    args = parser.parse_args()
    rows = []
    for model in args.models or [fixture_path(n) for n in FIXTURE_NAMES]:
        shapes = concrete_shapes(model)
        cap = half_peak_cap(model, shapes)
        rows += bench_model(model, [None, cap], input_shapes=shapes, repeats=args.repeats,
                            measure_rss=not args.no_rss)
        print(f"measured {model.name}", file=sys.stderr)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
