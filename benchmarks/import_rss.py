"""What ``import hyperion`` costs a process, and what a compile or a load then adds.

    python benchmarks/import_rss.py [--repeats N] [--importtime FILE]

Each figure comes from a fresh subprocess, median (min-max) over the repeats, in MiB:

- ``numpy + onnxruntime``: a process that imports only those (the reference of issue 11);
- ``import hyperion``: the same plus ``import hyperion``; VmRSS after the import;
- ``compile + run``: the demo model compiled (uncapped, and under a 1 MB cap) and run twice;
- ``load + run``: the schedules those compiles saved, loaded and run twice.

VmRSS counts the pages of shared libraries a process touched, and how many of those the
kernel maps at once depends on what the page cache holds (a freshly installed onnx shows
more of its C++ extension than a long-used one); RssAnon, the process's own memory, does
not, and is shown beside it. For compile and load the child reports VmHWM (the peak SPEC's promise is about) minus the
peak of an import-only process, and which heavy modules it holds (onnx, OpenSSL's
``_hashlib``, jsonschema, networkx, argparse). ``--importtime FILE`` also writes
``python -X importtime -c "import hyperion"``'s report there, the evidence of what is imported.
Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
DEMO = REPO / "hyperion" / "data" / "demo.onnx"
DEMO_SHAPES = {"image": [1, 3, 64, 64]}
DEMO_CAP = "1MB"
WATCHED = ("onnx", "_hashlib", "jsonschema", "networkx", "argparse", "hyperion.tools.cli", "hyperion.seed")

_REPORT = f"""
import json, sys
from pathlib import Path
def _status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024
print(json.dumps({{"rss": _status("VmRSS:"), "anon": _status("RssAnon:"), "hwm": _status("VmHWM:"),
                  "modules": len(sys.modules),
                  "loaded": [m for m in {WATCHED!r} if m in sys.modules]}}))
"""
REFERENCE = "import numpy, onnxruntime\n" + _REPORT
IMPORT = "import numpy, onnxruntime\nimport hyperion\n" + _REPORT
_FEEDS = f"""
import numpy as np
feeds = {{"image": np.linspace(-1, 1, num=int(np.prod({DEMO_SHAPES['image']})),
                               dtype=np.float32).reshape({DEMO_SHAPES['image']})}}
"""
COMPILE = "import sys\nimport hyperion\n" + _FEEDS + f"""
cap = None if sys.argv[2] == "none" else sys.argv[2]
cm = hyperion.compile({str(DEMO)!r}, memory_limit=cap, input_shapes={DEMO_SHAPES!r})
cm.run(feeds); cm.run(feeds)
cm.schedule.save(sys.argv[1])
""" + _REPORT
LOAD = "import sys\nimport hyperion\n" + _FEEDS + f"""
cm = hyperion.load({str(DEMO)!r}, sys.argv[1])
cm.run(feeds); cm.run(feeds)
""" + _REPORT


def measure(code: str, *args: str) -> dict:
    """One fresh interpreter's report (its last printed line)."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          cwd=REPO, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> str:
    return f"{statistics.median(values) / MIB:.1f} ({min(values) / MIB:.1f}-{max(values) / MIB:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--importtime", type=Path, help="write `python -X importtime` of `import hyperion` here")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hyperion-import-rss-"))
    schedules = {cap: folder / f"demo.{cap}.schedule.json" for cap in ("none", DEMO_CAP)}
    rows: dict[str, list[dict]] = {}
    for _ in range(args.repeats):   # interleaved, so a busy moment of the machine spreads over every row
        rows.setdefault("numpy + onnxruntime", []).append(measure(REFERENCE))
        rows.setdefault("import hyperion", []).append(measure(IMPORT))
        for cap, path in schedules.items():
            label = "uncapped" if cap == "none" else f"cap {cap}"
            rows.setdefault(f"compile + run ({label})", []).append(measure(COMPILE, str(path), cap))
            rows.setdefault(f"load + run ({label})", []).append(measure(LOAD, str(path)))
    reference = statistics.median(r["rss"] for r in rows["numpy + onnxruntime"])
    reference_anon = statistics.median(r["anon"] for r in rows["numpy + onnxruntime"])
    baseline = statistics.median(r["hwm"] for r in rows["import hyperion"])
    print(f"{sys.version.split()[0]}, {args.repeats} fresh processes per row; MiB, median (min-max)\n")
    print("| process | VmRSS | over numpy + onnxruntime | RssAnon over it | peak over import-only | modules | holds |")
    print("|---|---|---|---|---|---|---|")
    for label, reports in rows.items():
        rss = [r["rss"] for r in reports]
        over_import = "" if label in ("numpy + onnxruntime", "import hyperion") else \
            _median([r["hwm"] - baseline for r in reports])
        anon = _median([r["anon"] - reference_anon for r in reports])
        print(f"| {label} | {_median(rss)} | {_median([v - reference for v in rss])} | {anon} | {over_import} | "
              f"{reports[0]['modules']} | {', '.join(reports[0]['loaded']) or '-'} |")
    if args.importtime:
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import hyperion"], capture_output=True,
                              text=True, check=True, cwd=REPO)
        args.importtime.write_text(done.stderr)


if __name__ == "__main__":
    main()
