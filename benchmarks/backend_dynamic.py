"""onnx's backend node tests whose sizes the data decides, under a memory cap.

Every model of onnx's node test cases (``onnx.backend.test.case.node``) that onnxruntime's
own backend passes here (tests/backend_support/ort_passing.txt) and that has a tensor
whose size is unknown before running -- which a cap refused outright before re-planning --
is compiled under ``--cap`` and run on the test's inputs; its outputs are compared with
plain onnxruntime's on the same inputs (bit for bit). Prints how each was planned
(bounded / re-planned), the plans a run made, and every failure with its error.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx.backend.test.loader import load_node_model_tests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hyperion  # noqa: E402
from hyperion.frontend import import_model, load_source  # noqa: E402
from hyperion.frontend.bounds import unsized_tensors  # noqa: E402
from tests.backend_support.suite import read_passlist  # noqa: E402


def _compare(a: Any, b: Any) -> str:
    """``exact``, ``close`` (floats within the suite's rtol 1e-5: segments change which
    kernels onnxruntime fuses, so float rounding may differ) or ``differ``."""
    if isinstance(b, np.ndarray):
        if not isinstance(a, np.ndarray) or a.dtype != b.dtype or a.shape != b.shape:
            return "differ"
        if np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            return "exact"
        close = a.dtype.kind in "fc" and np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        return "close" if close else "differ"
    if isinstance(b, list):
        if not isinstance(a, list) or len(a) != len(b):
            return "differ"
        return _worst([_compare(x, y) for x, y in zip(a, b, strict=True)])
    return "exact" if a == b else "differ"


def _worst(results: list[str]) -> str:
    return max(results, key=["exact", "close", "differ"].index, default="exact")


def run_case(model: onnx.ModelProto, inputs: list[Any], cap: str) -> tuple[str, str]:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    # onnx stores some scalar inputs as numpy scalars (Range's start, limit, delta), which
    # onnxruntime's run() refuses: they are fed as the 0-d arrays they stand for.
    feeds = {name: np.asarray(value) if isinstance(value, np.generic) else value
             for name, value in zip(names, inputs, strict=True)}
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    cm = hyperion.compile(model, memory_limit=cap, input_shapes={
        name: list(np.shape(value)) for name, value in feeds.items() if isinstance(value, np.ndarray)})
    ours = list(cm.run(feeds).values())
    ours_again = list(cm.run(feeds).values())
    how = "re-planned" if cm.schedule.replan is not None else "bounded"
    replans = cm.replans
    if len(ours) != len(reference):
        return how, "differ"
    result = _worst([_compare(a, b) for a, b in zip(ours, reference, strict=True)])
    if _worst([_compare(a, b) for a, b in zip(ours_again, reference, strict=True)]) != result:
        return how, "second run differs"
    if replans is not None and replans.last_run_plans:
        return how, "second run planned again"
    return how, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", default="64MB")
    parser.add_argument("-k", default="", help="only tests whose name contains one of these (comma-separated)")
    args = parser.parse_args()
    passing = {name.removesuffix("_cpu") for name in read_passlist()}
    tally: collections.Counter[tuple[str, str]] = collections.Counter()
    for case in sorted(load_node_model_tests(), key=lambda c: c.name):
        wanted = any(part in case.name for part in args.k.split(","))
        if case.name not in passing or not wanted or case.model is None or not case.data_sets:
            continue
        try:
            imported = import_model(load_source(case.model), isolate_symbolic=True)
        except hyperion.HyperionError:
            continue
        if not unsized_tensors(imported):
            continue
        try:
            how, result = run_case(case.model, list(case.data_sets[0][0]), args.cap)
        except hyperion.HyperionError as error:
            how, result = "refused", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        except Exception as error:  # noqa: BLE001 - a report of everything that went wrong
            how, result = "error", f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        tally[(how, result if result in ("exact", "close") else "failed")] += 1
        print(f"{case.name}: {how}: {result}", flush=True)
    print()
    for (how, result), count in sorted(tally.items()):
        print(f"{how} {result}: {count}")


if __name__ == "__main__":
    main()
