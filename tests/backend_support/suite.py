"""The ONNX backend conformance suite as both onnxruntime and Hyperion run it.

One place builds the suite, so the pass list computed with onnxruntime and the
tests run through Hyperion cover exactly the same cases.
"""

from __future__ import annotations

import importlib.metadata
import os
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx.backend.test

HERE = Path(__file__).resolve().parent
PASSLIST = HERE / "ort_passing.txt"

# Groups left out of the suite on purpose, pattern -> reason. Every other test
# the onnx package ships is run (CUDA variants skip themselves: both backends
# are CPU-only here).
EXCLUDED: dict[str, str] = {}


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("onnx", "onnxruntime", "numpy")}


def backend_test(backend: Any, parent_module: str | None = None) -> onnx.backend.test.BackendTest:
    """The suite over ``backend`` (a Backend class or module), exclusions applied."""
    suite = onnx.backend.test.BackendTest(backend, parent_module)
    for pattern in EXCLUDED:
        suite.exclude(pattern)
    return suite


def iter_tests(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from iter_tests(item)
        else:
            yield item


def use_scratch_onnx_home(directory: Path) -> None:
    """The light-model tests write their inputs under $ONNX_HOME; keep that out of ~."""
    os.environ["ONNX_HOME"] = str(directory)


def read_passlist(path: Path = PASSLIST) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
