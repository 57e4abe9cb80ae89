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

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

import hyperion
from tests.conftest import FIXTURE_NAMES, example_feeds, fixture_path, reference_outputs


@functools.cache
def _model(name: str) -> onnx.ModelProto:
    return onnx.load(str(fixture_path(name)))   # external data loaded: the fixtures are small


def _all_default_domain(graph: onnx.GraphProto) -> bool:
    return all(node.domain in ("", "ai.onnx") and all(_all_default_domain(a.g) for a in node.attribute
                                                       if a.type == onnx.AttributeProto.GRAPH)
               for node in graph.node)


FLOAT64_FIXTURES = [name for name in FIXTURE_NAMES if _all_default_domain(_model(name).graph)]


def _to_double(graph: onnx.GraphProto) -> None:
    """Every float32 tensor, type and cast of ``graph`` (and its subgraphs) made float64, in place."""
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for info in (*graph.input, *graph.output, *graph.value_info):
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type == TensorProto.FLOAT:
            tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _to_double(attribute.g)
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float64)))
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.DOUBLE


def _float64_reference(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = onnx.ModelProto()
    model.CopyFrom(_model(name))
    _to_double(model.graph)
    evaluator = ReferenceEvaluator(model)
    doubled = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    names = [o.name for o in model.graph.output]
    return dict(zip(names, evaluator.run(None, doubled), strict=True))


def _error(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The largest absolute difference over the float outputs."""
    return max((float(np.max(np.abs(outputs[k].astype(np.float64) - reference[k]), initial=0.0))
                for k in reference if np.asarray(outputs[k]).dtype == np.float32), default=0.0)


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
def test_segmented_and_fed_plans_stay_within_twice_onnxruntimes_float64_error(name: str, plan: str) -> None:
    feeds = example_feeds(name)
    if plan == "smallest_cap_fed":
        compiled = _smallest_fed_plan(name, feeds)
    else:
        compiled = hyperion.compile(fixture_path(name), mode="memory_opt", max_segment_steps=3)
    got = compiled.run(feeds)
    exact = _float64_reference(name, feeds)
    plain = _error(reference_outputs(fixture_path(name), feeds), exact)
    assert _error(got, exact) <= 2 * plain, f"{_error(got, exact):.3g} against onnxruntime's {plain:.3g}"


def test_normal_mode_is_bit_identical_to_onnxruntime(fixture_name: str) -> None:
    feeds = example_feeds(fixture_name)
    got = hyperion.compile(fixture_path(fixture_name)).run(feeds)
    for output, value in reference_outputs(fixture_path(fixture_name), feeds).items():
        np.testing.assert_array_equal(got[output], value, err_msg=output)
