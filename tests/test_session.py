"""hyperion.InferenceSession against onnxruntime's own: the same test bodies run on both.

Each test written in onnxruntime's style (``sess.get_inputs()[0].name``, ``sess.run([name],
feeds)``, ``except InvalidArgument``) takes ``session_class`` and runs once with
``onnxruntime.InferenceSession`` and once with ``hyperion.InferenceSession`` under a cap:
the idioms are unchanged, the results the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, InvalidProtobuf, NoSuchFile

import hyperion
from hyperion.session import ModelMetadata, NodeArg, as_onnxruntime_error
from tests.conftest import example_feeds, fixture_path

CPU = ["CPUExecutionProvider"]
NODE_ARG_FIXTURES = ("mlp", "dynamic_dims", "control_flow", "old_opset", "demo", "encoder_outputs",
                     "transformer_block_fused")
SessionClass = Callable[..., Any]


def _hyperion_session(*args: Any, **kwargs: Any) -> hyperion.InferenceSession:
    return hyperion.InferenceSession(*args, memory_limit="64MB", **kwargs)


@pytest.fixture(params=["onnxruntime", "hyperion"])
def session_class(request: pytest.FixtureRequest) -> SessionClass:
    return ort.InferenceSession if request.param == "onnxruntime" else _hyperion_session


def _mul_1() -> bytes:
    """onnxruntime's test model mul_1.onnx: Y = X * X over float[3, 2]."""
    graph = helper.make_graph([helper.make_node("Mul", ["X", "X"], ["Y"])], "mul_1",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 2])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="backend-test", doc_string="mul", model_version=3)
    model.graph.doc_string = "the mul graph"
    helper.set_model_props(model, {"author": "tests", "licence": "MIT"})
    return model.SerializeToString()


def _loose_types() -> bytes:
    """Symbolic, unnamed and missing dims, an output declared without a shape, a sequence output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", None, 3])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", None, 3]),
               helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)]
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Cast", ["x"], ["ids"], to=TensorProto.INT64),
             helper.make_node("SequenceConstruct", ["x", "y"], ["seq"])]
    graph = helper.make_graph(nodes, "loose", [x], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


# -- the idioms of onnxruntime's Python tests ------------------------------------------------------------
def test_run_model(session_class: SessionClass) -> None:
    sess = session_class(_mul_1(), providers=CPU)
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    input_name = sess.get_inputs()[0].name
    assert input_name == "X"
    assert sess.get_inputs()[0].shape == [3, 2]
    output_name = sess.get_outputs()[0].name
    assert output_name == "Y"
    assert sess.get_outputs()[0].shape == [3, 2]
    assert sess.get_outputs()[0].type == "tensor(float)"
    res = sess.run([output_name], {input_name: x})
    output_expected = np.array([[1.0, 4.0], [9.0, 16.0], [25.0, 36.0]], dtype=np.float32)
    np.testing.assert_allclose(output_expected, res[0], rtol=1e-05, atol=1e-08)


def test_run_model_from_path_with_session_options(session_class: SessionClass) -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = session_class(str(fixture_path("mlp")), so, providers=CPU)
    assert sess.get_session_options().intra_op_num_threads == 1
    assert sess.get_providers() == CPU
    res = sess.run(None, example_feeds("mlp"))
    assert res[0].shape == (1, 10)


def test_output_order_is_the_order_asked(session_class: SessionClass) -> None:
    sess = session_class(str(fixture_path("encoder_outputs")), providers=CPU)
    feeds = example_feeds("encoder_outputs", batch=2)
    everything = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    assert len(everything) == len(names) == 6
    asked = ["attentions_2", "logits", "hidden_state_0"]
    res = sess.run(asked, feeds)
    assert len(res) == 3
    for name, value in zip(asked, res, strict=True):
        np.testing.assert_allclose(value, everything[names.index(name)], rtol=1e-5, atol=1e-6)
    assert [r.shape for r in res] == [(2, 2, 8, 8), (2, 4), (2, 8, 32)]


def test_none_and_empty_list_mean_every_output(session_class: SessionClass) -> None:
    sess = session_class(str(fixture_path("dynamic_dims")), providers=CPU)
    feeds = example_feeds("dynamic_dims", batch=3)
    for output_names in (None, []):
        res = sess.run(output_names, feeds)
        assert [r.shape for r in res] == [(3, 4), (3, 8)]


def test_same_output_twice(session_class: SessionClass) -> None:
    sess = session_class(str(fixture_path("dynamic_dims")), providers=CPU)
    res = sess.run(["logits", "logits"], example_feeds("dynamic_dims"))
    assert len(res) == 2
    np.testing.assert_array_equal(res[0], res[1])


def test_run_options_accepted(session_class: SessionClass) -> None:
    sess = session_class(_mul_1(), providers=CPU)
    ro = ort.RunOptions()
    ro.logid = "test"
    res = sess.run(["Y"], {"X": np.ones((3, 2), np.float32)}, ro)
    np.testing.assert_array_equal(res[0], np.ones((3, 2), np.float32))


def test_run_with_ort_values(session_class: SessionClass) -> None:
    sess = session_class(_mul_1(), providers=CPU)
    x = ort.OrtValue.ortvalue_from_numpy(np.full((3, 2), 2.0, np.float32))
    res = sess.run_with_ort_values(["Y"], {"X": x})
    assert isinstance(res[0], ort.OrtValue)
    np.testing.assert_array_equal(res[0].numpy(), np.full((3, 2), 4.0, np.float32))


def test_model_meta(session_class: SessionClass) -> None:
    modelmeta = session_class(_mul_1(), providers=CPU).get_modelmeta()
    assert modelmeta.producer_name == "backend-test"
    assert modelmeta.graph_name == "mul_1"
    assert modelmeta.domain == ""
    assert modelmeta.description == "mul"
    assert modelmeta.graph_description == "the mul graph"
    assert modelmeta.version == 3
    assert modelmeta.custom_metadata_map == {"author": "tests", "licence": "MIT"}


@pytest.mark.parametrize(("feeds", "match"), [
    ({"input_ids": np.zeros((2, 8), np.int32)}, "data type|dtype"),
    ({"input_ids": np.zeros(8, np.int64)}, "rank|shape"),
    ({"input_ids": np.zeros((2, 8), np.int64), "bogus": np.zeros(1)}, "input name"),
])
def test_bad_feed_raises_invalid_argument(session_class: SessionClass, feeds: dict, match: str) -> None:
    sess = session_class(str(fixture_path("dynamic_dims")), providers=CPU)
    with pytest.raises(InvalidArgument, match=match):
        sess.run(None, feeds)


def test_wrong_dimension_raises_invalid_argument(session_class: SessionClass) -> None:
    sess = session_class(str(fixture_path("mlp")), providers=CPU)
    with pytest.raises(InvalidArgument):
        sess.run(None, {"x": np.zeros((1, 65), np.float32)})


def test_missing_input_raises_value_error(session_class: SessionClass) -> None:
    sess = session_class(str(fixture_path("dynamic_dims")), providers=CPU)
    with pytest.raises(ValueError, match="missing from input feed"):
        sess.run(None, {})


def test_unknown_output_name_raises_invalid_argument(session_class: SessionClass) -> None:
    sess = session_class(str(fixture_path("dynamic_dims")), providers=CPU)
    with pytest.raises(InvalidArgument, match="output name"):
        sess.run(["nope"], example_feeds("dynamic_dims"))


def test_missing_file_raises_no_such_file(session_class: SessionClass, tmp_path: Any) -> None:
    with pytest.raises(NoSuchFile):
        session_class(str(tmp_path / "missing.onnx"), providers=CPU)


def test_garbage_raises_invalid_protobuf(session_class: SessionClass) -> None:
    with pytest.raises(InvalidProtobuf):
        session_class(b"not a model", providers=CPU)


# -- compared with onnxruntime's answers ----------------------------------------------------------------
def _args(node_args: list) -> list[tuple[str, list, str]]:
    return [(a.name, list(a.shape), a.type) for a in node_args]


@pytest.mark.parametrize("name", NODE_ARG_FIXTURES)
def test_node_args_match_onnxruntime(name: str) -> None:
    ours = hyperion.InferenceSession(str(fixture_path(name)), providers=CPU)
    theirs = ort.InferenceSession(str(fixture_path(name)), providers=CPU)
    assert _args(ours.get_inputs()) == _args(theirs.get_inputs())
    assert _args(ours.get_outputs()) == _args(theirs.get_outputs())
    assert _args(ours.get_overridable_initializers()) == _args(theirs.get_overridable_initializers())
    assert all(isinstance(a, NodeArg) for a in ours.get_inputs() + ours.get_outputs())


def test_node_args_of_loose_types_match_onnxruntime() -> None:
    model = _loose_types()
    ours = hyperion.InferenceSession(model)
    theirs = ort.InferenceSession(model, providers=CPU)
    assert _args(ours.get_inputs()) == _args(theirs.get_inputs()) == [("x", ["N", None, 3], "tensor(float)")]
    assert _args(ours.get_outputs()) == _args(theirs.get_outputs())
    assert ours.get_outputs()[2].type == "seq(tensor(float))"
    assert str(ours.get_inputs()[0]) == str(theirs.get_inputs()[0])


@pytest.mark.parametrize("name", (*NODE_ARG_FIXTURES, "transformer_block"))
def test_model_meta_matches_onnxruntime(name: str) -> None:
    ours = hyperion.InferenceSession(str(fixture_path(name))).get_modelmeta()
    theirs = ort.InferenceSession(str(fixture_path(name)), providers=CPU).get_modelmeta()
    assert isinstance(ours, ModelMetadata)
    for field in ("producer_name", "graph_name", "domain", "description", "graph_description", "version",
                  "custom_metadata_map"):
        assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.parametrize("name", ("dynamic_dims", "encoder_outputs", "control_flow", "demo"))
def test_outputs_equal_onnxruntime(name: str) -> None:
    ours = hyperion.InferenceSession(str(fixture_path(name)), memory_limit="4MB" if name == "demo" else "1MB")
    theirs = ort.InferenceSession(str(fixture_path(name)), providers=CPU)
    feeds = example_feeds(name, batch=2) if name in ("dynamic_dims", "encoder_outputs", "demo") else \
        example_feeds(name)
    for got, want in zip(ours.run(None, feeds), theirs.run(None, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- Hyperion's own rules ---------------------------------------------------------------------------------
def test_errors_are_hyperions_and_onnxruntimes() -> None:
    sess = hyperion.InferenceSession(str(fixture_path("dynamic_dims")))
    with pytest.raises(hyperion.FeedError) as caught:
        sess.run(None, {"input_ids": np.zeros((2, 8), np.float32)})
    assert isinstance(caught.value, InvalidArgument | ValueError | hyperion.HyperionError)
    assert isinstance(caught.value, InvalidArgument)
    error = as_onnxruntime_error(hyperion.RuntimeExecutionError("segment 0 failed"))
    assert isinstance(error, hyperion.RuntimeExecutionError)
    assert isinstance(error, ort.capi.onnxruntime_pybind11_state.RuntimeException)
    limit = hyperion.MemoryLimitError("too small", smallest_limit_bytes=7)
    assert as_onnxruntime_error(limit) is limit  # no onnxruntime counterpart


def test_providers() -> None:
    path = str(fixture_path("mlp"))
    with pytest.raises(hyperion.OptionError, match="CUDAExecutionProvider"):
        hyperion.InferenceSession(path, providers=["CUDAExecutionProvider"])
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        sess = hyperion.InferenceSession(path, providers=[("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
    assert sess.get_providers() == CPU
    assert sess.get_provider_options() == {"CPUExecutionProvider": {}}


def test_session_options_threads_reach_the_sessions() -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = hyperion.InferenceSession(str(fixture_path("mlp")), so, memory_limit="1MB")
    assert sess.compiled_model.session_config.intra_op_num_threads == 1


def test_overridable_initializers_cannot_be_fed() -> None:
    sess = hyperion.InferenceSession(str(fixture_path("old_opset")))
    assert [a.name for a in sess.get_overridable_initializers()] == ["conv1.weight", "conv1.bias", "fc.weight",
                                                                    "fc.bias"]
    feeds = {**example_feeds("old_opset"), "fc.bias": np.zeros(10, np.float32)}
    with pytest.raises(InvalidArgument, match="initializer"):
        sess.run(None, feeds)


def test_session_runs_only_what_the_outputs_need() -> None:
    sess = hyperion.InferenceSession(str(fixture_path("encoder_outputs")), memory_limit="1MB")
    feeds = example_feeds("encoder_outputs", batch=2)
    sess.run(["hidden_state_1"], feeds)
    nodes = {step.node for step in sess.schedule.steps}
    assert "layer1.ffn_norm" in nodes
    assert not any(node.startswith("layer2.") or node.startswith("classifier") for node in nodes)
    assert sess.schedule.graph_outputs == ("hidden_state_1",)


def test_session_repr_is_one_line() -> None:
    sess = hyperion.InferenceSession(str(fixture_path("mlp")), memory_limit="1MB")
    assert repr(sess).startswith("<hyperion.InferenceSession mlp.onnx adaptive")
    assert "\n" not in repr(sess)
    assert onnx.load(str(fixture_path("mlp"))).graph.name == sess.get_modelmeta().graph_name
