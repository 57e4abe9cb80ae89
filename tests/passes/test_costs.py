"""The cost rules of passes/memory/costs.py against their sources: MLAS's buffer sizing and
what onnxruntime allocates, measured in a fresh process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from hyperion.passes.memory.costs import relayout_bytes, workspace_bytes
from tests.conftest import run_python
from tests.passes.helpers import program_from_model


def _conv(channels: int, filters: int, size: int, kernel: int, *, pads: int, batch_norm: bool = False):
    weight = numpy_helper.from_array(np.ones((filters, channels, kernel, kernel), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[pads] * 4)]
    initializers = [weight]
    out = size + 2 * pads - kernel + 1
    if batch_norm:
        for name in ("scale", "bias", "mean", "var"):
            initializers.append(numpy_helper.from_array(np.ones(filters, np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["y", "scale", "bias", "mean", "var"], ["z"], name="bn"))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1, channels, size, size])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT,
                                                             [1, filters, out, out])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("channels", "filters", "size", "kernel", "pads", "expected"), [
    (64, 256, 8, 3, 1, 4 * 8 * 8 * 64 * 9),   # more filters than output pixels: the whole expansion
    (16, 16, 32, 3, 1, 0),                    # fewer: a few panels per thread
    (64, 256, 8, 1, 0, 0),                    # pointwise, no stride or padding: a direct GEMM
])
def test_a_fed_convolutions_buffer_is_sized_as_mlas_sizes_it(channels: int, filters: int, size: int, kernel: int,
                                                             pads: int, expected: int) -> None:
    graph = program_from_model(_conv(channels, filters, size, kernel, pads=pads)).graph
    node = graph.nodes["conv"]
    assert workspace_bytes(graph, node, weights_fed=True) == expected
    io = (graph.tensors["x"].nbytes or 0) + (graph.tensors["y"].nbytes or 0)
    assert workspace_bytes(graph, node, weights_fed=False) == io      # NCHWc copies with a constant weight


def test_rewriting_a_convolution_costs_one_copy_and_three_with_a_batch_norm_folded_in() -> None:
    plain = program_from_model(_conv(8, 16, 8, 3, pads=1)).graph
    folded = program_from_model(_conv(8, 16, 8, 3, pads=1, batch_norm=True)).graph
    weight = plain.tensors["w"].nbytes or 0
    assert relayout_bytes(plain, plain.nodes["conv"]) == weight
    assert relayout_bytes(folded, folded.nodes["conv"]) == 3 * weight


FED_CONV_RSS = """
import json, sys
import numpy as np
import onnxruntime as ort
from hyperion.runtime.sessions import session_options
from hyperion.tools.rss import peak_rss_bytes
session = ort.InferenceSession(open(sys.argv[1], "rb").read(), session_options(threads=2, arena=False, prepack=False),
                               providers=["CPUExecutionProvider"])
x = np.ones((1, 1024, 16, 16), np.float32)
w = np.ones((1024, 1024, 3, 3), np.float32)
before = peak_rss_bytes()
y = session.run(None, {"x": x, "w": w})[0]
print(json.dumps({"grown": peak_rss_bytes() - before - y.nbytes}))
"""


def test_the_expanded_buffer_is_what_onnxruntime_allocates(tmp_path: Path) -> None:
    """The UNet's deepest Conv (1024 channels, 3x3, at 16x16), its weight fed: 9 MiB expanded."""
    model = _conv(1024, 1024, 16, 3, pads=1)
    del model.graph.initializer[:]
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1024, 1024, 3, 3]))
    path = tmp_path / "conv.onnx"
    path.write_bytes(model.SerializeToString())
    graph = program_from_model(_conv(1024, 1024, 16, 3, pads=1)).graph
    expected = workspace_bytes(graph, graph.nodes["conv"], weights_fed=True)
    grown = json.loads(run_python(FED_CONV_RSS, str(path)))["grown"]
    assert 0.8 * expected <= grown <= 1.2 * expected + (1 << 20)
