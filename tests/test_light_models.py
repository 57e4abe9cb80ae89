"""The real-architecture "light" models that ship inside the onnx package, under memory caps.

Each model (weights generated at run time by ConstantOfShape, so the files are
small; import computes them once and makes them weights, docs/constants.md) is compiled
without a cap to read its accounted peak P, then under caps of P, P/2 and the smallest
feasible cap S (what ``MemoryLimitError`` names for a cap of one byte). Under every cap
that can be met, the outputs equal plain onnxruntime's and the accounted peak stays at or
under the cap.

With the weights streamed, P/2 fits every model (before import computed the weights, a
single step holding a generated weight as an activation set each model's peak, and P/2
was refused for all nine).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest

import hyperion
from tests.conftest import assert_outputs_equal, reference_outputs

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@dataclass(frozen=True)
class Expected:
    residual: int     # skip connections classify_edges must find, counted from the architecture
    into: str         # the op every residual edge ends in ("" when there are none)


EXPECTED = {
    # 16 bottleneck blocks (3 + 4 + 6 + 3): 12 identity shortcuts into the Sum, and the
    # first block of each stage's projection shortcut, whose first edge enters a 1x1 Conv.
    "resnet50": Expected(16, "Sum|Conv"),
    # 58 dense layers (6 + 12 + 24 + 16): each one's input skips its BN-ReLU-Conv layers
    # into the Concat that appends the new features.
    "densenet121": Expected(58, "Concat"),
    # 13 stride-1 units (3 + 7 + 3) add an identity shortcut; the 3 stride-2 units join
    # an AveragePool shortcut by Concat, which is not a summing join (see classify_edges).
    "shufflenet": Expected(13, "Sum"),
    # Branches of different lengths joined by Concat, and plain chains: no skips.
    "inception_v1": Expected(0, ""),
    "inception_v2": Expected(0, ""),
    "squeezenet": Expected(0, ""),
    "bvlc_alexnet": Expected(0, ""),
    "vgg19": Expected(0, ""),
    "zfnet512": Expected(0, ""),
}


@dataclass(frozen=True)
class LightModel:
    path: Path
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    peak_bytes: int                                   # accounted peak without a cap
    uncapped: hyperion.CompiledModel
    half_refused: hyperion.MemoryLimitError | None    # what compiling under peak_bytes // 2 raised

    @property
    def smallest_bytes(self) -> int:
        """The smallest cap any mode can meet, as the refusal names it."""
        if self.half_refused is not None:
            return self.half_refused.smallest_limit_bytes
        with pytest.raises(hyperion.MemoryLimitError) as refused:
            hyperion.compile(self.path, memory_limit=1)
        return refused.value.smallest_limit_bytes


@cache
def light_model(name: str) -> LightModel:
    """Compiled once without a cap and once under half its peak (which also names the smallest cap)."""
    path = LIGHT / f"light_{name}.onnx"
    uncapped = hyperion.compile(path)
    feeds = {name: _input(shape) for name, shape in _input_shapes(path).items()}
    peak = uncapped.schedule.peak_bytes
    try:
        hyperion.compile(path, memory_limit=peak // 2)  # adaptive: normal, memory_opt, then streaming
        refused = None
    except hyperion.MemoryLimitError as error:
        refused = error
    return LightModel(path, feeds, reference_outputs(path, feeds), peak, uncapped, refused)


def _input_shapes(path: Path) -> dict[str, list[int]]:
    model = onnx.load(path, load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in weights}


def _input(shape: list[int]) -> np.ndarray:
    # The values the ONNX backend runner feeds these models: a ramp over [0, 1).
    count = int(np.prod(shape))
    return (np.arange(count).reshape(shape) / count).astype(np.float32)


def _run_under(model: LightModel, cap: int) -> hyperion.CompiledModel:
    compiled = hyperion.compile(model.path, memory_limit=cap)
    assert_outputs_equal(compiled.run(model.feeds), model.reference)
    assert compiled.schedule.peak_bytes <= cap
    assert compiled.stats.peak_bytes <= cap
    return compiled


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_under_a_cap_of_the_uncapped_peak(name: str) -> None:
    model = light_model(name)
    assert model.smallest_bytes <= model.peak_bytes
    assert _run_under(model, model.peak_bytes).schedule.mode == "normal"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_under_the_smallest_feasible_cap(name: str) -> None:
    model = light_model(name)
    compiled = _run_under(model, model.smallest_bytes)
    # The smallest cap is met; tight, but where the one-byte plan's spatial patches (cut
    # for its floor) named it: under the cap itself the steps are cut for the cap, and may
    # peak lower (light_densenet121: 28378368 under a named 28423168, 29552688 without patches).
    assert compiled.schedule.peak_bytes <= model.smallest_bytes
    assert compiled.schedule.mode == "memory_opt"                # ... and it took streaming weights to meet it


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_under_half_the_peak(name: str) -> None:
    model = light_model(name)
    assert model.half_refused is None
    compiled = _run_under(model, model.peak_bytes // 2)
    # The weights were computed at import: no segment computes one on every run.
    assert all(segment.fold_constants for segment in compiled.schedule.segments)
    tensors = compiled.schedule.tensors
    assert all((tensors[output].bytes or 0) <= 4096 for step in compiled.schedule.steps
               if step.op_type == "ConstantOfShape" for output in step.outputs)  # only small fills stay nodes


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_edge_kinds_match_the_architecture(name: str) -> None:
    compiled = light_model(name).uncapped
    expected = EXPECTED[name]
    kinds = Counter(str(kind.value) for _, _, kind in compiled.graph.edges(data="kind"))
    assert kinds["residual"] == expected.residual
    assert kinds["attention"] == 0
    assert kinds["sequential"] == compiled.graph.number_of_edges() - expected.residual
    residual_targets = {compiled.graph.nodes[dst]["op_type"]
                        for _, dst, kind in compiled.graph.edges(data="kind") if kind.value == "residual"}
    assert residual_targets == (set(expected.into.split("|")) if expected.into else set())
