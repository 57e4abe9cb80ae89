"""Building IR graphs from inline ONNX text for pass tests."""

from __future__ import annotations

import onnx

from hyperion.frontend import import_model, load_source
from hyperion.passes import Program


def program_from_text(text: str) -> Program:
    """A Program for an ONNX model written in onnx.parser's text format, its nodes as
    written (tensors computed from constants stay nodes: the passes must handle what
    import does not make weights)."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return Program(import_model(load_source(model, fold_constants=False)).graph)


def program_from_model(model: onnx.ModelProto | str) -> Program:
    return Program(import_model(load_source(model, fold_constants=False)).graph)


def kinds(program: Program) -> dict[tuple[str, str], str]:
    """(src, dst) -> kind for every edge (fixtures here have one tensor per node pair)."""
    return {(e.src, e.dst): e.kind.value for e in program.graph.edges()}
