"""Hyperion's compiler passes, installed as ``hyperion.passes``.

One pass per module; the infrastructure (``Pass``, ``PassResult``,
``PassManager``) is in :mod:`hyperion.passes._infra`. Grouped where it helps:
``ordering/`` (the order pass and its search), ``memory/`` (arena planning and
onnxruntime's cost model), ``batch/`` (batch separability).
"""

from __future__ import annotations

from hyperion.passes._infra import (
    Pass,
    PassManager,
    PassResult,
    default_passes,
    require,
)

__all__ = ["Pass", "PassManager", "PassResult", "default_passes", "require"]
