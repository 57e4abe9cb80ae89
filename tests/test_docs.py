"""Every Python example in README.md and docs/ runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for i, code in enumerate(BLOCK.findall(doc.read_text(encoding="utf-8"))):
            found.append((f"{doc.name}#{i}", code))
    return found


@pytest.mark.parametrize(("where", "code"), _examples(), ids=[w for w, _ in _examples()])
def test_example_runs(where: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if re.search(r"^import ray|hyperion\.ray", code, re.MULTILINE):
        pytest.importorskip("ray")   # the extra hyperion[ray] (in the dev extra: make test runs them)
    # Examples use paths relative to the repository root; run them in a scratch copy of its layout.
    for name in ("fixtures", "examples", "hyperion"):  # hyperion/data/demo.onnx
        if (REPO / name).exists():
            os.symlink(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__main__"})
