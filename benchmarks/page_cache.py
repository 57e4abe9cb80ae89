"""Page-cache read bandwidth for a file that is already cached: the weight-read bound W / bandwidth.

On the 401 MB external-data file of the 20-layer MLP (fixtures/streaming_mlp.py; written to
``--model-dir`` if absent), after one full read that puts it in the page cache, each way of
getting its bytes into the process is timed ``--repeats`` times (median, min-max):

* ``np.fromfile``: a read into a freshly allocated array (page faults on the destination);
* ``readinto`` a reused buffer: a read into an array allocated and touched once (what a plan
  that reuses one buffer pays);
* ``mmap + touch``: a fresh read-only mapping, one byte read per 4 KiB page (page faults that
  map page-cache pages, no copy), then unmapped;
* ``mmap MAP_POPULATE``: a fresh mapping whose page tables the kernel fills at mmap time;
* ``mmap + read every byte``: a fresh mapping summed as uint64 — the least a kernel computing
  on mapped weights reads — and the same sum over the reused buffer (memory read bandwidth).

Prints Markdown and the bound for the whole file; ``--json`` writes the figures.

    python benchmarks/page_cache.py [--model-dir DIR] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAGE = mmap.PAGESIZE


def _fromfile(path: Path) -> None:
    np.fromfile(path, dtype=np.uint8)


def _readinto(path: Path, buffer: np.ndarray) -> None:
    with path.open("rb", buffering=0) as f:
        f.readinto(memoryview(buffer))


def _mapped(path: Path, flags: int, every_byte: bool = False) -> None:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) as m:
        # One byte per page faults each page in (or finds it populated); every byte is what a
        # kernel computing on the weights must at least read.
        view = np.frombuffer(m, dtype=np.uint64) if every_byte else np.frombuffer(m, dtype=np.uint8)[::PAGE]
        int(view.sum())
        del view


def timed(action: Callable[[], None], repeats: int) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="where the 401 MB MLP is (or is written); default a temp dir")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        from fixtures.streaming_mlp import streaming_mlp_in

        data = streaming_mlp_in(folder).with_name("streaming_mlp.onnx.data")
        size = data.stat().st_size
        _fromfile(data)                              # into the page cache
        buffer = np.ones(size, dtype=np.uint8)       # allocated and touched once
        ways = {
            "np.fromfile (fresh array)": lambda: _fromfile(data),
            "readinto a reused buffer": lambda: _readinto(data, buffer),
            "mmap + touch one byte per page": lambda: _mapped(data, mmap.MAP_SHARED),
            "mmap MAP_POPULATE + touch": lambda: _mapped(data, mmap.MAP_SHARED | mmap.MAP_POPULATE),
            "mmap + read every byte (uint64 sum)": lambda: _mapped(data, mmap.MAP_SHARED, every_byte=True),
            "reused buffer, read every byte (uint64 sum)": lambda: int(buffer.view(np.uint64).sum()),
        }
        figures = {name: timed(action, args.repeats) for name, action in ways.items()}
    print(f"{size / 1e6:.0f} MB file, already in the page cache; medians (min–max) of {args.repeats}\n")
    print("| way | ms | GB/s (median) | GB/s (best) |\n|---|---|---|---|")
    for name, f in figures.items():
        print(f"| {name} | {1e3 * f['median']:.1f} ({1e3 * f['min']:.1f}–{1e3 * f['max']:.1f}) | "
              f"{size / f['median'] / 1e9:.2f} | {size / f['min'] / 1e9:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "seconds": figures}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
