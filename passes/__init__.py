"""Hyperion's compiler passes, installed as ``hyperion.passes``.

One pass per module; the infrastructure (``Pass``, ``PassResult``,
``PassManager``) is in :mod:`hyperion.passes._infra`, the :class:`Program` they
work on in :mod:`hyperion.passes.program`, and the one function that builds the
pass list for a mode in :mod:`hyperion.passes.pipeline`. Grouped where it helps:
``ordering/`` (the order pass and its search), ``memory/`` (arena planning and
onnxruntime's cost model), ``batch/`` (batch separability).
"""

from __future__ import annotations

from hyperion.passes._infra import (
    Pass,
    PassManager,
    PassResult,
    ensure,
    require,
)
from hyperion.passes.program import Program

__all__ = ["Pass", "PassManager", "PassResult", "Program", "ensure", "require"]
