"""The smallest cap of each onnx light model, as a fraction of its uncapped accounted peak.

The light models compute every weight with ConstantOfShape; import makes them weights
(hyperion.frontend.fold, docs/constants.md). For each model, in a fresh process: the uncapped
plan's accounted peak, the smallest cap any mode fits (what ``MemoryLimitError`` names for a
cap of one byte, as ``hyperion compile --smallest-limit`` prints it) and the step that sets it,
the weights import computed and their bytes, and the uncapped compile time with the cache
entry written (a fresh cache folder) and reused (median of ``--repeats``). Run it against an older
checkout (``PYTHONPATH=<checkout>``) for the figures before.

    python benchmarks/folded_weights.py --models /work/cache/corpus_models/light [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20
CHILD = """
import json, sys, time
import hyperion
path = sys.argv[1]
started = time.perf_counter()
uncapped = hyperion.compile(path)
compile_s = time.perf_counter() - started
weights = [t for t in uncapped.ir.tensors.values() if t.role.value == "weight" and t.external is not None]
try:
    hyperion.compile(path, memory_limit=1)
    smallest, node = 1, None
except hyperion.MemoryLimitError as refusal:
    smallest, node = refusal.smallest_limit_bytes, refusal.node
print(json.dumps({"peak": uncapped.schedule.peak_bytes, "smallest": smallest, "node": node,
                  "computed": len(weights), "computed_bytes": sum(t.nbytes or 0 for t in weights),
                  "compile_s": compile_s}))
"""


def measure(path: Path, cache: Path) -> dict:
    environment = {**os.environ, "HYPERION_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True,
                          env=environment)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="folder of light_*.onnx")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = {}
    print("| model | uncapped peak MiB | smallest cap MiB | fraction | set by | weights computed | MiB | "
          "compile s (cache written) | compile s (cache reused) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(args.models.glob("light_*.onnx")):
        with tempfile.TemporaryDirectory(prefix="hyperion-cache-") as cache:
            first = measure(path, Path(cache))
            again = [measure(path, Path(cache))["compile_s"] for _ in range(args.repeats)]
        first["compile_again_s"] = statistics.median(again)
        rows[path.stem] = first
        print(f"| {path.stem} | {first['peak'] / MIB:.1f} | {first['smallest'] / MIB:.1f} | "
              f"{first['smallest'] / first['peak']:.0%} | `{first['node']}` | {first['computed']} | "
              f"{first['computed_bytes'] / MIB:.1f} | {first['compile_s']:.2f} | {first['compile_again_s']:.2f} "
              f"({min(again):.2f}-{max(again):.2f}) |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
