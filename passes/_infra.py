"""The pass infrastructure: passes, their results, and the manager that composes them.

A pass is a small object with a ``name`` and ``call(program) -> PassResult``;
calling it checks what it needs first (``requires``). The manager runs passes in
order, verifies the IR after each one, and wraps an unexpected failure in a
:class:`~hyperion.errors.PassError` that names the pass and the passes before it.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from hyperion.errors import HyperionError, PassError
from hyperion.ir import Program

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    program: Program
    modified: bool


class Pass(abc.ABC):
    name: ClassVar[str]

    def requires(self, program: Program) -> None:
        """Raise :class:`PassError` unless ``program`` has what this pass reads."""

    @abc.abstractmethod
    def call(self, program: Program) -> PassResult: ...

    def __call__(self, program: Program) -> PassResult:
        self.requires(program)
        return self.call(program)


def require(condition: object, pass_name: str, what: str) -> None:
    if not condition:
        raise PassError(f"pass {pass_name!r} needs {what}; run the passes before it first")


class PassManager:
    """Runs passes in order; verifies the IR after each when ``verify`` is set."""

    def __init__(self, passes: Sequence[Pass], *, verify: bool = True) -> None:
        self.passes = tuple(passes)
        self.verify = verify

    def __call__(self, program: Program) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            started = time.perf_counter()
            try:
                result = p(program)
            except HyperionError:
                raise
            except Exception as exc:
                raise PassError(f"pass {p.name!r} failed (after {done or 'no passes'}): {exc}") from exc
            if self.verify:
                program.graph.verify()
            log.debug("pass %s: %.1f ms, modified=%s", p.name, 1e3 * (time.perf_counter() - started),
                      result.modified)
            program = result.program
            modified |= result.modified
            done.append(p.name)
        return PassResult(program, modified)


def default_passes(*, max_segment_steps: int | None = None) -> list[Pass]:
    """The standard pipeline: classify, order, liveness, plan memory, segment."""
    from hyperion.passes.classify_edges import ClassifyEdgesPass
    from hyperion.passes.liveness import LivenessPass
    from hyperion.passes.memory.plan_memory import PlanMemoryPass
    from hyperion.passes.ordering.order import OrderPass
    from hyperion.passes.segment import SegmentPass

    return [ClassifyEdgesPass(), OrderPass(), LivenessPass(), PlanMemoryPass(),
            SegmentPass(max_segment_steps=max_segment_steps)]
