"""Peak memory of Hyperion's order next to the file's order, the proven optimum and onnxruntime.

Models: every fixture, and irregular graphs from ``fixtures/irregular.py`` — randomly
wired NAS-style networks, Inception-style multi-branch blocks and UNets (64×64 images, so
activations dominate). For each model, in ``memory_opt`` mode (live activations plus the
step's own weights, the order pass's objective):

* file order / Hyperion: peak accounted bytes at one step per segment with the ONNX
  file's node order and with the order pass's;
* optimum: the proven minimum over all topological orders with the default search budget,
  or, in brackets, with ``--exact-states`` (a larger budget, run here only); "—" when not
  proven either way;
* arena / live peak: the activation arena for Hyperion's order and its floor, the largest
  total of activations live at one step (graph inputs excluded);
* normal peak: accounted peak in ``normal`` mode (every weight resident), what compares
  with a process that holds the whole model;
* onnxruntime RSS / Hyperion RSS: peak RSS of a fresh process that loads and runs the
  model (plain onnxruntime; Hyperion compile + run, no cap) minus that of a process that
  only imports them, read from Linux's VmHWM (``hyperion.tools.bench.rss_pair``): a child's
  ``ru_maxrss`` inherits the parent's peak across exec, so it would report this process.

    python benchmarks/ordering.py
    python benchmarks/ordering.py --no-rss --exact-states 0
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from fixtures import FIXTURE_NAMES, example_feeds, fixture_path  # noqa: E402
from fixtures.irregular import inception, random_wired, unet  # noqa: E402
from hyperion.frontend import import_model, load_source  # noqa: E402
from hyperion.ir import ExecutionMode  # noqa: E402
from hyperion.passes.liveness import compute_liveness  # noqa: E402
from hyperion.passes.memory.plan_memory import plan_memory  # noqa: E402
from hyperion.passes.ordering.model import build_step_model  # noqa: E402
from hyperion.passes.ordering.order import plan_order  # noqa: E402
from hyperion.passes.ordering.regions import SearchBudget, decompose  # noqa: E402
from hyperion.tools.bench import rss_pair  # noqa: E402
from hyperion.tools.feeds import input_shapes_of, random_feeds  # noqa: E402
from hyperion.tools.report import markdown_table  # noqa: E402
from hyperion.units import format_size  # noqa: E402

SPATIAL = 64


def irregular_models() -> dict[str, onnx.ModelProto]:
    models = {f"randwire_{n}_s{seed}": random_wired(n, seed, spatial=SPATIAL)
              for n, seed in ((12, 1), (16, 1), (20, 7), (24, 3), (32, 2), (48, 5), (64, 4))}
    models |= {f"inception_{blocks}": inception(blocks, spatial=SPATIAL) for blocks in (4, 8)}
    models |= {f"unet_{depth}": unet(depth, spatial=SPATIAL) for depth in (3, 4)}
    return models


@dataclass(frozen=True)
class Row:
    model: str
    nodes: int
    regions: int
    file_peak: int
    hyperion_peak: int
    optimum: int | None
    optimum_large: int | None
    arena: int
    live_peak: int
    normal_peak: int
    order_ms: float
    ort_rss: int | None
    hyperion_rss: int | None


def measure(name: str, path: Path, feeds: dict[str, np.ndarray] | None, exact_states: int, rss: bool) -> Row:
    """One row; ``feeds`` None: seeded random feeds of the declared input shapes."""
    if feeds is None:
        declared = import_model(load_source(path)).graph
        feeds = random_feeds(declared, input_shapes_of(declared), seed=0)
    shapes = {name: tuple(value.shape) for name, value in feeds.items()}
    graph = import_model(load_source(path), shapes).graph
    mode = ExecutionMode.MEMORY_OPT
    started = time.perf_counter()
    result = plan_order(graph, mode)
    order_ms = 1e3 * (time.perf_counter() - started)
    large = None
    if result.optimal_peak_bytes is None and exact_states:
        budget = SearchBudget(quick_states=exact_states, max_states=exact_states, total_states=4 * exact_states)
        large = plan_order(graph, mode, budget).optimal_peak_bytes
    plan = plan_memory(graph, compute_liveness(graph, result.order), mode)
    regions = len(decompose(build_step_model(graph, graph.file_order(), mode)).regions)
    ort_rss = hyperion_rss = None
    if rss:
        ort_rss, hyperion_rss = rss_pair(path, feeds, None, "normal", shapes)
    return Row(name, len(graph.nodes), regions, result.file_peak_bytes, result.peak_bytes,
               result.optimal_peak_bytes, large, plan.arena_bytes, plan.live_peak_bytes,
               plan_order(graph, ExecutionMode.NORMAL).peak_bytes, order_ms, ort_rss, hyperion_rss)


def _size(value: int | None) -> str:
    return "—" if value is None else format_size(value)


HEADER = ("model", "nodes", "regions", "file order", "Hyperion", "saved", "optimum", "arena", "live peak",
          "normal peak", "onnxruntime RSS", "Hyperion RSS", "order ms")


def table(rows: list[Row]) -> str:
    return markdown_table(HEADER, (_cells(r) for r in rows))


def _cells(r: Row) -> tuple[object, ...]:
    optimum = _size(r.optimum) if r.optimum is not None else (
        f"({_size(r.optimum_large)})" if r.optimum_large is not None else "—")
    saved = 1 - r.hyperion_peak / r.file_peak if r.file_peak else 0.0
    return (r.model, r.nodes, r.regions, _size(r.file_peak), _size(r.hyperion_peak), f"{saved:.1%}", optimum,
            _size(r.arena), _size(r.live_peak), _size(r.normal_peak), _size(r.ort_rss), _size(r.hyperion_rss),
            f"{r.order_ms:.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurements")
    parser.add_argument("--exact-states", type=int, default=1_000_000,
                        help="budget of the extra exact search where the default one proves nothing (0: skip)")
    args = parser.parse_args()
    rows = [measure(name, fixture_path(name), example_feeds(name), args.exact_states, not args.no_rss)
            for name in FIXTURE_NAMES]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in irregular_models().items():
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(model, path)
            rows.append(measure(name, path, None, args.exact_states, not args.no_rss))
            print(f"measured {name}", file=sys.stderr)
    print(f"machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}; "
          f"peaks in memory_opt mode unless noted\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
