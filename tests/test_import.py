"""Import: the tensor table, node attributes and small constants in the IR, external data
located but not read, and clear errors on bad input; and what ``import hyperion`` itself
imports (and leaves out), against what a compile, a run and a load need."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest

import hyperion
from hyperion.digest import sha256
from hyperion.frontend import import_model, load_source
from hyperion.ir import SMALL_TENSOR_BYTES, TensorRole
from tests.conftest import RUNTIME_AXES_MEAN, fixture_path, run_python


def test_tensor_table_roles_sizes_producers_consumers() -> None:
    graph = import_model(load_source(fixture_path("seed_residual"))).graph
    x, weight, hidden, y = (graph.tensors[n] for n in ("x", "conv1.weight", "input_layer_out", "y"))
    assert (x.role, x.dtype, x.shape, x.nbytes) == (TensorRole.INPUT, "float32", (1, 256), 1024)
    assert (weight.role, weight.shape, weight.nbytes) == (TensorRole.WEIGHT, (256, 256), 256 * 256 * 4)
    assert hidden.role is TensorRole.ACTIVATION and hidden.producer == "input_layer"
    assert hidden.consumers == ("conv1", "residual")
    assert y.role is TensorRole.OUTPUT and y.producer == "output"


def test_attributes_constants_domains_and_slots_are_plain_ir_values() -> None:
    big = ", ".join(["1"] * (SMALL_TENSOR_BYTES // 4 + 1))
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[2, 8] x) => (float[2, 8] y, float[2, 8] z)
      <int64[2] shape = {{2, 8}}, float[{SMALL_TENSOR_BYTES // 4 + 1}] large = {{{big}}}> {{
        axes = Constant <value_ints = [0]> ()
        r = Reshape (x, shape)
        t = Transpose <perm = [0, 1]> (r)
        s = Softmax <axis = -1> (t)
        c = Clip (s, , shape)
        y = Identity (c)
        z = com.microsoft.Gelu (x)
    }}""")
    model.graph.node[4].domain = "ai.onnx"   # the file may spell the default domain out
    graph = import_model(load_source(model)).graph
    nodes = {node.op_type: node for node in graph.nodes.values()}
    assert nodes["Transpose"].attributes == {"perm": [0, 1]} and nodes["Softmax"].int_attribute("axis", 1) == -1
    assert nodes["Clip"].domain == "" and nodes["Clip"].is_default_domain
    assert nodes["Gelu"].domain == "com.microsoft" and not nodes["Gelu"].is_default_domain
    assert nodes["Clip"].input_slots == ("s", "", "shape") and nodes["Clip"].inputs == ("s", "shape")
    assert graph.constant("shape").tolist() == [2, 8] and graph.constant("axes").tolist() == [0]
    assert graph.constant("large") is None and graph.constant("x") is None   # too large; not a constant
    assert graph.opset == 17
    assert graph.predecessors("Clip_4") == ("Softmax_3",) and graph.successors("Reshape_1") == ("Transpose_2",)
    assert graph.topological_order(key=lambda n: -graph.nodes[n].index)[0] == "Gelu_6"
    assert graph.find_cycle() is None


def test_external_data_is_located_not_read(tmp_path: Path) -> None:
    for name in ("external_data.onnx", "external_data.onnx.data"):
        shutil.copy(fixture_path("external_data").parent / name, tmp_path / name)
    data = tmp_path / "external_data.onnx.data"
    data.write_bytes(b"\xff" * data.stat().st_size)  # garbage: importing must not care
    graph = import_model(load_source(tmp_path / "external_data.onnx")).graph
    weights = [t for t in graph.tensors.values() if t.role is TensorRole.WEIGHT and t.external]
    assert weights and all(t.external.path == str(data) for t in weights)
    assert sum(t.external.length for t in weights) <= data.stat().st_size
    assert all(t.external.length == t.nbytes for t in weights)


def test_truncated_external_data_names_file_and_weight(tmp_path: Path) -> None:
    for name in ("external_data.onnx", "external_data.onnx.data"):
        shutil.copy(fixture_path("external_data").parent / name, tmp_path / name)
    data = tmp_path / "external_data.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(hyperion.ModelLoadError, match=r"truncated external data.*weight"):
        hyperion.compile(tmp_path / "external_data.onnx")
    data.unlink()
    with pytest.raises(hyperion.ModelLoadError, match="missing"):
        hyperion.compile(tmp_path / "external_data.onnx")


def test_not_an_onnx_file_and_missing_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff\xfe")
    with pytest.raises(hyperion.ModelLoadError, match="junk.onnx"):
        hyperion.compile(junk)
    with pytest.raises(hyperion.ModelLoadError, match="no such model"):
        hyperion.compile(tmp_path / "absent.onnx")


def test_model_from_bytes_and_proto_give_the_same_plan() -> None:
    path = fixture_path("mlp")
    from_path = hyperion.compile(path).schedule
    from_bytes = hyperion.compile(path.read_bytes()).schedule
    from_proto = hyperion.compile(onnx.load(str(path))).schedule
    assert from_bytes.model.sha256 == from_path.model.sha256
    assert from_bytes.steps == from_path.steps == from_proto.steps


def test_old_opset_initializers_listed_as_inputs_are_weights() -> None:
    graph = import_model(load_source(fixture_path("old_opset"))).graph
    assert graph.inputs == ("x",)
    assert all(graph.tensors[t].role is TensorRole.WEIGHT for t in ("conv1.weight", "fc.weight"))


def test_control_flow_outer_scope_reads_are_node_inputs() -> None:
    graph = import_model(load_source(fixture_path("control_flow"))).graph
    by_op = {node.op_type: node for node in graph.nodes.values()}
    assert {"x", "W1"} <= set(by_op["If"].inputs)       # read inside the branches
    assert "bias" in by_op["Loop"].inputs                # read inside the body


def test_unnamed_and_duplicate_node_names_get_unique_ids() -> None:
    model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        a = Relu(x)
        y = Relu(a)
    }''')
    model.graph.node[1].name = "Relu_0"  # collides with the generated name of node 0
    graph = import_model(load_source(model)).graph
    assert len(graph.nodes) == 2 and len(set(graph.nodes)) == 2


def test_input_shapes_for_unknown_inputs_are_option_errors() -> None:
    with pytest.raises(hyperion.OptionError, match="no input 'nope'"):
        hyperion.compile(fixture_path("mlp"), input_shapes={"nope": [1]})
    with pytest.raises(hyperion.OptionError, match="fixed at 64"):
        hyperion.compile(fixture_path("mlp"), input_shapes={"x": [1, 65]})


@pytest.mark.parametrize("bad", ["12 parsecs", "-5MB", "", 0, -1, 1.5, True])
def test_bad_memory_limits_are_option_errors(bad: object) -> None:
    with pytest.raises(hyperion.OptionError, match="memory_limit"):
        hyperion.compile(fixture_path("mlp"), memory_limit=bad)  # type: ignore[arg-type]


def test_bad_mode_is_an_option_error() -> None:
    with pytest.raises(hyperion.OptionError, match="unknown mode 'fast'"):
        hyperion.compile(fixture_path("mlp"), mode="fast")


def test_shapes_from_onnxruntime_estimates_size_the_plan_but_are_not_declared() -> None:
    # onnx leaves the Split outputs unsized (their lengths are computed); onnxruntime's
    # symbolic inference sizes them, but it also guesses wrong in such graphs (an even
    # split), and a wrong declared shape makes onnxruntime reject a segment's feed.
    imported = import_model(load_source(onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 18]>
    g (float[2,8] x) => (float[2,8] y) {
        n = Shape <start = 1, end = 2> (x)
        zero = Sub (n, n)
        lengths = Concat <axis = 0> (n, zero)
        a, b = Split <axis = 1> (x, lengths)
        y = Concat <axis = 1> (a, b)
    }''')))
    assert imported.graph.tensors["a"].shape == (2, 8)
    declared = imported.value_types["a"].tensor_type
    assert declared.elem_type == onnx.TensorProto.FLOAT and not declared.HasField("shape")


def test_broadcast_partners_are_not_merged_into_one_shape() -> None:
    # mean is [1, 1] (ReduceMean over every axis, keepdims); merging it with x's dims
    # in Div(x, mean) gave [3, 4], a size that was never true.
    model = onnx.parser.parse_model(RUNTIME_AXES_MEAN)
    graph = import_model(load_source(model)).graph
    assert graph.tensors["mean"].shape != (3, 4)
    assert graph.tensors["mean"].nbytes is None


def test_input_shapes_for_a_sequence_input_is_an_option_error() -> None:
    model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 18]>
    g (seq(float[2]) s) => (int64 n) {
        n = SequenceLength (s)
    }''')
    with pytest.raises(hyperion.OptionError, match="'s' is not a tensor"):
        hyperion.compile(model, input_shapes={"s": [3, 2]})


# -- What `import hyperion` imports (docs/memory.md, "import") ----------------------------------
# SPEC's promise subtracts a process that only imports hyperion and onnxruntime: whatever a
# compile or a run needs belongs in that import (else it lands under the cap), whatever none
# needs does not (else every user pays for it).
_MODULES = """
import json, sys
import hyperion
{work}
print(json.dumps(sorted(sys.modules)))
"""
_DEMO_FEEDS = "import numpy as np\nfeeds = {'image': np.ones((1, 3, 64, 64), dtype=np.float32)}\n"
_COMPILE_AND_RUN = _DEMO_FEEDS + """
cm = hyperion.compile(sys.argv[1], memory_limit="1MB", input_shapes={"image": [1, 3, 64, 64]})
cm.run(feeds)
"""
_LOAD_AND_RUN = _DEMO_FEEDS + """
cm = hyperion.load(sys.argv[1], sys.argv[2])
cm.run(feeds)
"""
_NEVER_IMPORTED = ("_hashlib", "networkx", "sympy", "jsonschema", "matplotlib", "ray", "hyperion.seed",
                   "hyperion.session", "hyperion.planner.partition", "hyperion.runtime.tracing", "hyperion.tools")


def _modules_after(work: str = "", *args: str) -> set[str]:
    return set(json.loads(run_python(_MODULES.format(work=work), *args)))


@functools.cache
def _imported_by_import_hyperion() -> frozenset[str]:
    return frozenset(_modules_after())


def test_import_hyperion_loads_what_a_compile_and_a_run_need_and_nothing_else() -> None:
    imported = _imported_by_import_hyperion()
    assert {"onnx", "hyperion.planner.plan", "hyperion.passes.pipeline", "hyperion.runtime.executor",
            "hyperion.replan", "hyperion.runtime.tiles"} <= imported
    assert not imported & set(_NEVER_IMPORTED)   # OpenSSL's libcrypto among them: the SHA-256 is built in


def test_compile_and_run_import_no_module_of_hyperion_that_import_did_not() -> None:
    after = _modules_after(_COMPILE_AND_RUN, str(fixture_path("demo")))
    assert {m for m in after - _imported_by_import_hyperion() if m.startswith("hyperion")} == set()
    assert not after & set(_NEVER_IMPORTED)


def test_load_and_run_import_nothing_of_hyperion_beyond_import_and_no_openssl(tmp_path: Path) -> None:
    cm = hyperion.compile(fixture_path("demo"), memory_limit="1MB", input_shapes={"image": [1, 3, 64, 64]})
    schedule = cm.schedule.save(tmp_path / "demo.schedule.json")
    after = _modules_after(_LOAD_AND_RUN, str(fixture_path("demo")), str(schedule))
    assert {m for m in after - _imported_by_import_hyperion() if m.startswith("hyperion")} == set()
    assert "jsonschema" in after   # a loaded schedule is validated against its JSON Schema (SPEC)
    assert not after & (set(_NEVER_IMPORTED) - {"jsonschema"})


def test_lazy_public_names_resolve_and_unknown_ones_raise() -> None:
    namespace: dict[str, object] = {}
    exec("from hyperion import *", namespace)
    assert set(hyperion.__all__) <= set(namespace) and set(hyperion.__all__) <= set(dir(hyperion))
    assert hyperion.partition is hyperion.planner.partition.partition
    assert hyperion.InferenceSession.__module__ == "hyperion.session"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = hyperion.nope   # type: ignore[attr-defined]


def test_built_in_sha256_is_hashlibs() -> None:
    data = bytes(range(256)) * 1000
    digest = sha256(data[:100])
    digest.update(data[100:])
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert sha256().hexdigest() == hashlib.sha256(b"").hexdigest()
