"""segment rule 9: sessions rebuilt on every run when the kept sessions' bookkeeping does not
fit; rule 7: the caller's graph inputs under a cap; the smallest cap adaptive names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import hyperion
from hyperion.ir import ExecutionMode
from hyperion.passes.memory.costs import SESSION_BOOKKEEPING_ALLOWANCE_BYTES, session_bookkeeping_bytes
from tests.conftest import ATOL, RTOL
from tests.passes.test_segment import matmul_chain, segmented

LAYERS = 20                       # 39 one-node segments: 20 relaid MatMuls, 19 Relus
CAP = 1_000_000                   # below the bookkeeping of every session kept
FED = {"prepack_weights": False, "max_segment_steps": 1, "prefetch": False, "weight_cache_bytes": 0}


def scaled_chain() -> onnx.ModelProto:
    """The MatMul chain with its weights scaled to keep activations near 1 through 20 layers."""
    model = matmul_chain(LAYERS)
    for weight in model.graph.initializer:
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) / 8, weight.name))
    return model


def kept_bookkeeping(relaid: tuple[bool, ...]) -> int:
    """What the plan would count at every step with every session kept (rule 9)."""
    return sum(session_bookkeeping_bytes(1, r) for r in relaid) - SESSION_BOOKKEEPING_ALLOWANCE_BYTES


def test_sessions_whose_bookkeeping_does_not_fit_are_rebuilt_every_run() -> None:
    seg = segmented(matmul_chain(LAYERS), ExecutionMode.MEMORY_OPT, CAP, **FED).segmentation
    assert len(seg.spans) == 2 * LAYERS - 1
    # Every session kept would not fit the cap: before rule 9 rebuilt any, the cap was refused.
    assert kept_bookkeeping(seg.relaid) > CAP
    assert seg.peak_bytes <= CAP and 0 < len(seg.rebuilt) < len(seg.spans)
    # With room for every session's bookkeeping, none is rebuilt.
    roomy = segmented(matmul_chain(LAYERS), ExecutionMode.MEMORY_OPT, CAP + kept_bookkeeping(seg.relaid), **FED)
    assert roomy.segmentation.rebuilt == ()


def test_a_rebuilt_plan_runs_building_its_rebuilt_sessions_and_matches_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "chain.onnx"
    onnx.save(scaled_chain(), str(path), save_as_external_data=True, location="chain.onnx.data",
              size_threshold=0)
    cm = hyperion.compile(path, memory_limit=CAP, mode="memory_opt", max_segment_steps=1)
    rebuilt = [s.index for s in cm.schedule.segments if not s.persistent]
    assert rebuilt and cm.schedule.peak_bytes <= CAP and cm.schedule.kept_heap_bytes == 0
    x = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
    cm.run(x)
    got = cm.run(x)["y"]
    assert cm.stats.sessions.built == len(rebuilt)   # the kept ones are built once, on the first run
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, plain, rtol=RTOL, atol=ATOL)
    cm.close()


# A 1 MiB input read by the first step alone.
BIG_INPUT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[512, 512] x) => (float[512, 1] y) {
    r = ReduceMax <axes = [1], keepdims = 1> (x)
    a = Relu (r)
    y = Neg (a)
}"""


def test_under_a_cap_the_callers_large_inputs_count_after_their_last_use() -> None:
    model = onnx.parser.parse_model(BIG_INPUT)
    options = {"max_segment_steps": 1, "weight_cache_bytes": 0, "keep_heap": False}   # rule 14 aside
    free = segmented(model, ExecutionMode.MEMORY_OPT, None, **options).segmentation
    capped = segmented(model, ExecutionMode.MEMORY_OPT, 10**9, **options).segmentation
    # x is read by step 0 only; the caller holds it through the later steps.
    assert [c - f for c, f in zip(capped.step_bytes, free.step_bytes, strict=True)] == [0] + [512 * 512 * 4] * 2
    # A small input is left to the allowance.
    small = segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, 10**9, **options).segmentation
    assert small.step_bytes == segmented(matmul_chain(), ExecutionMode.MEMORY_OPT, None, **options
                                         ).segmentation.step_bytes


@pytest.mark.parametrize("name", ["unet"])
def test_adaptive_names_no_larger_a_cap_than_memory_opt_and_it_works(name: str) -> None:
    from fixtures import example_feeds, fixture_path

    shapes = {n: v.shape for n, v in example_feeds(name).items()}

    def smallest(mode: str) -> int:
        with pytest.raises(hyperion.MemoryLimitError) as info:
            hyperion.compile(fixture_path(name), memory_limit=1, mode=mode, input_shapes=shapes)
        return info.value.smallest_limit_bytes

    adaptive, memory_opt = smallest("adaptive"), smallest("memory_opt")
    assert adaptive <= memory_opt
    assert hyperion.compile(fixture_path(name), memory_limit=adaptive, input_shapes=shapes).schedule.peak_bytes \
        <= adaptive


class _CreepingPlanner:
    """A planner whose refusals each name one byte more than the cap tried, and whose plans
    fit only from ``fits_from`` on: the caps named creep up and never reach it."""

    def __init__(self, fits_from: int) -> None:
        self.fits_from, self.tried = fits_from, []

    def run(self, mode: ExecutionMode, limit: int) -> None:
        self.tried.append(limit)
        if limit < self.fits_from:
            raise hyperion.MemoryLimitError("too small", smallest_limit_bytes=limit + 1)


def test_the_smallest_cap_named_is_one_a_plan_fitted_even_when_the_named_caps_creep() -> None:
    from hyperion.planner.plan import _verified_smallest

    planner = _CreepingPlanner(fits_from=50_000_000)
    smallest = _verified_smallest(planner, ExecutionMode.MEMORY_OPT, 1_000_000)  # type: ignore[arg-type]
    assert smallest >= planner.fits_from
    assert smallest in planner.tried
    assert smallest < 2 * planner.fits_from   # bisected back down towards it


def test_a_mode_no_cap_fits_is_a_planner_error_not_a_cap_named() -> None:
    from hyperion.errors import PassError
    from hyperion.planner.plan import _verified_smallest

    with pytest.raises(PassError, match="no memory_opt plan fits under any limit"):
        _verified_smallest(_CreepingPlanner(fits_from=2**80), ExecutionMode.MEMORY_OPT, 1_000)  # type: ignore[arg-type]
