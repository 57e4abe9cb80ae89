"""How exact each path is, against plain onnxruntime and against a float64 reference.

* ``normal`` mode runs the user's model in one session: bit-identical to onnxruntime.
* Segmented plans, and fed weights (``prepack_weights=False``: weights handed to
  sessions built once), are not: a segment boundary cuts the fusions onnxruntime makes
  across it (MatMul+Add into Gemm, LayerNormalization, Gelu), an unpacked GEMM sums its
  panels in another order, and a convolution whose weight is fed is neither rewritten by
  the NCHWc layout transformer nor fused with a following BatchNormalization (both need
  the weight when the session is built). The promise there: the error against a float64
  reference is at most twice plain onnxruntime's.

The float64 reference is onnx's reference evaluator (numpy) on the model converted to
double; it covers the fixtures whose ops are all in the default ONNX domain.
"""

from __future__ import annotations

import numpy as np
import pytest

import hyperion
from tests.conftest import (
    FIXTURE_NAMES,
    all_default_domain,
    example_feeds,
    fixture_model,
    fixture_path,
    float64_reference,
    float_error,
    reference_outputs,
)

FLOAT64_FIXTURES = [name for name in FIXTURE_NAMES if all_default_domain(fixture_model(name).graph)]


def _smallest_fed_plan(name: str, feeds: dict[str, np.ndarray]) -> hyperion.CompiledModel:
    """The fixture at the smallest cap its fed memory_opt plan meets: every segment it can
    cut, every large weight fed."""
    path, shapes = fixture_path(name), {k: v.shape for k, v in feeds.items()}
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(path, mode="memory_opt", memory_limit=1, prepack_weights=False, input_shapes=shapes)
    return hyperion.compile(path, mode="memory_opt", memory_limit=refused.value.smallest_limit_bytes,
                            prepack_weights=False, input_shapes=shapes)


@pytest.mark.parametrize("name", FLOAT64_FIXTURES)
@pytest.mark.parametrize("plan", ["three_steps_a_segment", "smallest_cap_fed"])
def test_segmented_and_fed_plans_stay_within_twice_onnxruntimes_float64float_error(name: str, plan: str) -> None:
    feeds = example_feeds(name)
    if plan == "smallest_cap_fed":
        compiled = _smallest_fed_plan(name, feeds)
    else:
        compiled = hyperion.compile(fixture_path(name), mode="memory_opt", max_segment_steps=3)
    got = compiled.run(feeds)
    exact = float64_reference(name, feeds)
    plain = float_error(reference_outputs(fixture_path(name), feeds), exact)
    assert float_error(got, exact) <= 2 * plain, f"{float_error(got, exact):.3g} against onnxruntime's {plain:.3g}"


def test_normal_mode_is_bit_identical_to_onnxruntime(fixture_name: str) -> None:
    feeds = example_feeds(fixture_name)
    got = hyperion.compile(fixture_path(fixture_name)).run(feeds)
    for output, value in reference_outputs(fixture_path(fixture_name), feeds).items():
        np.testing.assert_array_equal(got[output], value, err_msg=output)
