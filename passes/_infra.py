"""The pass infrastructure: passes, their results, and the manager that composes them.

A pass is a small object with a ``name`` and ``call(program) -> PassResult``.
Calling it runs ``requires`` (what it reads is there), ``call``, then ``ensures``
(its postcondition holds). Passes update the program in place and return it.

``PassResult.modified`` means one thing for every pass: the pass changed the IR
(an edge kind) or an analysis result of the program relative to its input. A pass
run again on its own output therefore reports ``modified=False``.

The manager runs passes in order, verifies the IR after each one, and wraps an
unexpected failure in a :class:`~hyperion.errors.PassError` that names the pass
and the passes before it. Typed Hyperion errors (a cap that cannot be met, a model
that cannot be streamed) pass through unchanged: they are answers, not bugs.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from hyperion.errors import HyperionError, PassError
from hyperion.passes.program import Program

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    program: Program
    modified: bool   # the IR or an analysis result changed (see the module docstring)


class Pass(abc.ABC):
    name: ClassVar[str]

    def requires(self, program: Program) -> None:
        """Raise :class:`PassError` unless ``program`` has what this pass reads."""

    @abc.abstractmethod
    def call(self, program: Program) -> PassResult: ...

    def ensures(self, program: Program) -> None:
        """Raise :class:`PassError` unless this pass's postcondition holds on ``program``."""

    def __call__(self, program: Program) -> PassResult:
        self.requires(program)
        result = self.call(program)
        self.ensures(result.program)
        return result


def require(condition: object, pass_name: str, what: str) -> None:
    if not condition:
        raise PassError(f"pass {pass_name!r} needs {what}; run the passes before it first")


def ensure(condition: object, pass_name: str, what: str) -> None:
    if not condition:
        raise PassError(f"pass {pass_name!r} broke its postcondition: {what}")


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
                result.program.graph.verify()
            log.debug("pass %s: %.1f ms, modified=%s", p.name, 1e3 * (time.perf_counter() - started),
                      result.modified)
            program = result.program
            modified |= result.modified
            done.append(p.name)
        return PassResult(program, modified)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)
