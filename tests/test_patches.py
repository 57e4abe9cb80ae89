"""Spatial patches: chains of Convs, pools and elementwise ops run patch by patch along rows
with halos, each output pixel computed from the same operands as whole -- bit for bit
against onnxruntime's whole run when the Convs' weights are constants (onnxruntime's
NCHWc kernels, as ``prepack_weights=True`` plans run them). Fed weights run as MLAS's
im2col and GEMM, whose sums for a patch can differ from the whole tensor's in the last
bits (measured: a 3x3 stride-2 Conv over 31 columns, 7.6e-06 of outputs of magnitude
~10): those plans are held to the promise of every fed Conv (docs/memory.md). One
chain is not patched bit for bit: a ConvTranspose followed by BatchNormalization, which
onnxruntime's basic optimizer folds into the ConvTranspose when the rows are known (the
whole model) and not when they are symbolic (a patch), 9.5e-07 apart. And chains with a
residual Add: onnxruntime's NCHWc layout transformer (the full optimization level; at the
basic and extended ones these patch bit for bit) fuses around the Add otherwise when the
rows are known -- seen with a BatchNormalization after it (up to 9.5e-07 on outputs of
magnitude ~2, in 22 of 30 chains Conv-Relu-Add-BatchNormalization), rarely with a Resize and a
MaxPool after it (3e-08): those are held to RESIDUAL_ULPS float32 spacings of the output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import hyperion
from hyperion.frontend import import_model, load_source
from hyperion.passes.tile_patches import ROWS, patch_plan
from hyperion.passes.tile_regions import Region as TileRegion
from hyperion.passes.tile_regions import _strands
from hyperion.planner.emit import patches_record
from hyperion.runtime.patches import patch_model
from hyperion.runtime.regions import run_region
from hyperion.runtime.sessions import session_options
from hyperion.schedule import Region
from tests.conftest import float64_outputs, float_error, reference_outputs

RESIDUAL_ULPS = 16
EXAMPLES = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
F = TensorProto.FLOAT


class _Chain:
    """A chain of layers built node by node: every tensor NCHW, its shape tracked."""

    def __init__(self, channels: int, rows: int, columns: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self.shape = [1, channels, rows, columns]
        self.input_shape = list(self.shape)
        self.last = "x"

    def __repr__(self) -> str:
        layers = ", ".join(f"{n.op_type}({n.name}: {', '.join(f'{a.name}={list(a.ints) or a.i}' for a in n.attribute)})"
                           for n in self.nodes)
        return f"<chain {self.input_shape}: {layers}>"

    def _name(self, kind: str) -> str:
        return f"{kind}{len(self.nodes)}"

    def _add(self, op: str, inputs: list[str], shape: list[int], **attributes: object) -> str:
        name = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        self.shape = shape
        self.last = name
        return name

    def _weight(self, shape: list[int]) -> str:
        name = f"w{len(self.weights)}"
        self.weights[name] = self.rng.standard_normal(shape).astype(np.float32)
        return name

    @staticmethod
    def _out(size: int, kernel: int, stride: int, dilation: int, top: int, bottom: int) -> int:
        return (size + top + bottom - (kernel - 1) * dilation - 1) // stride + 1

    def conv(self, source: str, filters: int, kernel: int, stride: int, dilation: int, top: int, bottom: int,
             groups: int = 1) -> str:
        n, c, h, w = self.shape
        weight, bias = self._weight([filters, c // groups, kernel, kernel]), self._weight([filters])
        side = kernel // 2
        shape = [n, filters, self._out(h, kernel, stride, dilation, top, bottom),
                 self._out(w, kernel, 1, 1, side, side)]
        return self._add("Conv", [source, weight, bias], shape, kernel_shape=[kernel, kernel],
                         strides=[stride, 1], dilations=[dilation, 1], pads=[top, side, bottom, side], group=groups)

    def pool(self, op: str, kernel: int, stride: int, top: int, bottom: int) -> str:
        n, c, h, w = self.shape
        shape = [n, c, self._out(h, kernel, stride, 1, top, bottom), self._out(w, kernel, 1, 1, 0, 0)]
        extra = {"count_include_pad": 1} if op == "AveragePool" else {}
        return self._add(op, [self.last], shape, kernel_shape=[kernel, kernel], strides=[stride, 1],
                         pads=[top, 0, bottom, 0], **extra)

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "patches", [helper.make_tensor_value_info("x", F, self.input_shape)],
                                  [helper.make_tensor_value_info(self.last, F, None)],
                                  [numpy_helper.from_array(v, n) for n, v in self.weights.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


_LAYER = st.sampled_from(["conv", "relu", "maxpool", "avgpool", "batchnorm", "residual", "fire", "upsample",
                          "sigmoid_mul", "resize"])
# Resize modes whose rows patch exactly: (mode, coordinate_transformation_mode, nearest_mode).
RESIZES = [("nearest", "asymmetric", "floor"), ("nearest", "half_pixel", "round_prefer_floor"),
           ("nearest", "pytorch_half_pixel", "round_prefer_ceil"), ("linear", "asymmetric", "floor"),
           ("linear", "half_pixel", "floor"), ("linear", "pytorch_half_pixel", "floor")]


def _build(draw: st.DrawFn) -> _Chain:
    chain = _Chain(draw(st.integers(1, 6)), draw(st.integers(12, 40)), draw(st.integers(5, 19)),
                   draw(st.integers(0, 2**16)))
    for layer in draw(st.lists(_LAYER, min_size=1, max_size=5)):
        rows = chain.shape[2]
        kernel, stride, dilation = draw(st.sampled_from([1, 2, 3, 5])), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        if (kernel - 1) * dilation + 1 > rows:
            continue
        pads = (draw(st.integers(0, kernel - 1)), draw(st.integers(0, kernel - 1)))
        if layer == "conv":
            chain.conv(chain.last, draw(st.integers(1, 8)), kernel, stride, dilation, *pads)
        elif layer == "relu":
            chain._add("Relu", [chain.last], chain.shape)
        elif layer in ("maxpool", "avgpool") and 1 < kernel <= chain.shape[3]:
            chain.pool("MaxPool" if layer == "maxpool" else "AveragePool", kernel, stride, *pads)
        elif layer == "batchnorm" and not (chain.nodes and chain.nodes[-1].op_type == "ConvTranspose"):
            c = chain.shape[1]
            stats = [chain._weight([c]) for _ in range(3)]
            chain.weights[stats[2]] = np.abs(chain.weights[stats[2]]) + 0.5
            chain._add("BatchNormalization", [chain.last, stats[0], stats[1], stats[0], stats[2]], chain.shape)
        elif layer == "residual" and kernel % 2 and dilation == 1:    # x + Relu(Conv(x)), rows kept
            source, shape = chain.last, list(chain.shape)
            chain._add("Relu", [chain.conv(source, shape[1], kernel, 1, 1, kernel // 2, kernel // 2)], chain.shape)
            chain._add("Add", [source, chain.last], shape)
        elif layer == "fire":        # squeeze, then 1x1 and kxk expands concatenated: two halos
            squeezed = chain.conv(chain.last, 2, 1, 1, 1, 0, 0)
            one = chain.conv(squeezed, 3, 1, 1, 1, 0, 0)
            shape = list(chain.shape)
            chain.shape[1] = 2
            odd = kernel | 1
            wide = chain.conv(squeezed, 4, odd, 1, 1, odd // 2, odd // 2)
            chain._add("Concat", [one, wide], [shape[0], 7, shape[2], shape[3]], axis=1)
        elif layer == "upsample":    # ConvTranspose 2x2 stride 2: rows double, no overlap
            n, c, h, w = chain.shape
            weight = chain._weight([c, 3, 2, 2])
            chain._add("ConvTranspose", [chain.last, weight], [n, 3, 2 * h, 2 * w], kernel_shape=[2, 2],
                       strides=[2, 2])
        elif layer == "resize" and chain.shape[2] * 3 <= 60:   # rows times an integer, columns any scale
            mode, coordinates, rounding = draw(st.sampled_from(RESIZES))
            # Linear rows by 3 are not bit for bit (test_linear_rows_by_a_scale_of_three_...).
            row_scale = draw(st.sampled_from([1, 2, 3] if mode == "nearest" else [1, 2]))
            scales = [1.0, 1.0, float(row_scale), draw(st.sampled_from([1.0, 2.0, 1.5]))]
            n, c, h, w = chain.shape
            name = f"scales{len(chain.nodes)}"
            chain.weights[name] = np.array(scales, np.float32)
            chain._add("Resize", [chain.last, "", name], [n, c, int(h * scales[2]), int(w * scales[3])], mode=mode,
                       coordinate_transformation_mode=coordinates, nearest_mode=rounding)
        elif layer == "sigmoid_mul":  # SiLU
            source = chain.last
            chain._add("Mul", [source, chain._add("Sigmoid", [source], chain.shape)], chain.shape)
    if not chain.nodes:
        chain._add("Relu", ["x"], chain.shape)
    return chain


@st.composite
def chains(draw: st.DrawFn) -> tuple[_Chain, int]:
    chain = _build(draw)
    assume(chain.shape[ROWS] >= 2)   # strided layers can leave a single row: nothing to patch
    return chain, draw(st.integers(2, min(7, chain.shape[ROWS])))


def _patched_region(model: onnx.ModelProto, patches: int) -> tuple[Region, list[str]]:
    """The schedule's Region for the whole chain cut into ``patches`` patches of its output rows."""
    graph = import_model(load_source(model)).graph
    nodes = [n.name for n in model.graph.node]
    axes = {t: ROWS for n in nodes for t in (*graph.nodes[n].inputs, *graph.nodes[n].outputs)
            if not graph.is_weight(t)}
    output = model.graph.node[-1].output[0]
    size = int(graph.tensors[output].shape[ROWS])  # type: ignore[index]
    bounds = tuple(size * i // patches for i in range(patches + 1))
    plan = patch_plan(graph, nodes, axes, [output], bounds)
    interior = {t: ROWS for t in axes if t not in ("x", output)}
    region = TileRegion(0, len(nodes), size, bounds, {"x": ROWS}, {output: ROWS}, interior, 0, plan)
    schedule_region = Region(size=size, bounds=bounds, sliced={"x": ROWS}, outputs={output: ROWS}, staging_bytes=0,
                             patches=patches_record(SimpleNamespace(graph=graph), region))  # type: ignore[arg-type]
    return schedule_region, nodes


@EXAMPLES
@given(case=chains())
def test_patches_equal_the_whole_run_bit_for_bit(case: tuple[_Chain, int]) -> None:
    chain, patches = case
    model = chain.model()
    feeds = {"x": chain.rng.standard_normal(chain.input_shape).astype(np.float32)}
    expected = reference_outputs(model.SerializeToString(), feeds)[chain.last]
    region, nodes = _patched_region(model, patches)
    patched = patch_model(onnx.ModelProto.FromString(model.SerializeToString()), region, nodes)
    session = ort.InferenceSession(patched.SerializeToString(), session_options(prepack=True),
                                   providers=["CPUExecutionProvider"])
    actual = run_region(session, region, feeds, {chain.last: (expected.dtype, expected.shape)})[0]
    assert len(region.bounds) - 1 == patches
    if any(node.op_type == "Add" for node in chain.nodes):
        # A residual Add: onnxruntime's NCHWc layout transformer may fuse it otherwise with
        # the rows known (see the module's docstring): within a few float32 roundings.
        bound = RESIDUAL_ULPS * float(np.spacing(np.abs(expected).max()))
        assert float(np.abs(actual - expected).max()) <= bound, np.abs(actual - expected).max()
    else:
        assert np.array_equal(actual, expected), np.abs(actual - expected).max()


def _resized_chain(mode: str, coordinates: str, rows: int, row_scale: int, seed: int) -> _Chain:
    chain = _Chain(2, rows, 7, seed)
    n, c, h, w = chain.shape
    chain.weights["scales"] = np.array([1, 1, row_scale, 2], np.float32)
    chain._add("Resize", ["x", "", "scales"], [n, c, h * row_scale, w * 2], mode=mode,
               coordinate_transformation_mode=coordinates)
    return chain


def _run_patched(chain: _Chain, patches: int, feeds: dict[str, np.ndarray], like: np.ndarray) -> np.ndarray:
    region, nodes = _patched_region(chain.model(), patches)
    patched = patch_model(chain.model(), region, nodes)
    session = ort.InferenceSession(patched.SerializeToString(), session_options(prepack=True),
                                   providers=["CPUExecutionProvider"])
    return run_region(session, region, feeds, {chain.last: (like.dtype, like.shape)})[0]


def test_a_linear_resize_reads_a_row_either_side_and_keeps_only_rows_it_interpolated_whole() -> None:
    chain = _resized_chain("linear", "half_pixel", 12, 2, 0)
    region, _ = _patched_region(chain.model(), 3)
    # Output rows 0-7, 8-15, 16-23 (half-pixel: x = r/2 - 1/4) read input rows 0-4, 3-8, 7-11:
    # each patch makes 2 rows per input row read and hands out the 8 it interpolated as whole.
    assert region.patches is not None
    assert region.patches.rows["x"] == ((0, 5), (3, 9), (7, 12))
    (crop,) = region.patches.crops
    assert crop.reader == "" and crop.rows == ((0, 8), (2, 10), (2, 10))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(6, 60), patches=st.integers(2, 5), seed=st.integers(0, 2**16),
       coordinates=st.sampled_from(["asymmetric", "half_pixel", "pytorch_half_pixel"]))
def test_linear_rows_by_a_scale_of_three_are_within_the_rounding_of_their_coordinate(
        rows: int, patches: int, seed: int, coordinates: str) -> None:
    """x = r/3 - offset is rounded in float32 for the whole tensor's row r and for the
    patch's row r - 3*first: the interpolation weights can differ by one ulp of the
    largest coordinate, so a pixel by that much of the rows it interpolates between."""
    chain = _resized_chain("linear", coordinates, rows, 3, seed)
    feeds = {"x": chain.rng.standard_normal(chain.input_shape).astype(np.float32)}
    expected = reference_outputs(chain.model().SerializeToString(), feeds)[chain.last]
    actual = _run_patched(chain, patches, feeds, expected)
    bound = 2 * float(np.spacing(np.float32(rows))) * float(np.abs(feeds["x"]).max())
    assert float(np.abs(actual - expected).max()) <= bound


def test_a_patch_inside_the_tensor_is_fed_its_halo_and_no_padding() -> None:
    chain = _Chain(2, 30, 8, 0)
    chain.conv("x", 4, 3, 1, 1, 1, 1)
    chain.pool("MaxPool", 2, 2, 0, 0)
    region, _ = _patched_region(chain.model(), 3)
    # Output rows 0-4, 5-9, 10-14 of the pool need Conv rows 0-9, 10-19, 20-29, which need
    # input rows -1..10, 9..20, 19..30: the first and last clipped and padded instead.
    assert region.patches is not None
    assert region.patches.rows["x"] == ((0, 11), (9, 21), (19, 30))
    (pad,) = region.patches.pads
    assert pad.node == "conv0" and pad.rows == ((1, 0), (0, 0), (0, 1)) and pad.fill == 0.0
    assert region.patches.crops == ()


def _unet_block(up: str = "ConvTranspose") -> onnx.ModelProto:
    """An encoder-decoder step of a UNet at 1x3x192x192: Conv, MaxPool, Conv, up by 2 (a
    ConvTranspose, or a Resize: ``nearest`` or ``linear``), Concat with the skip, two Convs:
    the skip is 2.3 MiB, the concatenation 4.5 MiB (large enough that the bookkeeping of the
    sessions patches keep does not dominate)."""
    rng = np.random.default_rng(1)
    upsampled = 16 if up == "ConvTranspose" else 32
    weights = {name: rng.standard_normal(shape).astype(np.float32) * 0.2 for name, shape in
               {"w0": [16, 3, 3, 3], "w1": [32, 16, 3, 3], "up": [32, 16, 2, 2], "w2": [16, 16 + upsampled, 3, 3],
                "w3": [2, 16, 1, 1]}.items()}
    weights["scales"] = np.array([1, 1, 2, 2], np.float32)
    same = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    upsampling = (helper.make_node("ConvTranspose", ["r1", "up"], ["u"], name="up0", kernel_shape=[2, 2],
                                   strides=[2, 2]) if up == "ConvTranspose" else
                  helper.make_node("Resize", ["r1", "", "scales"], ["u"], name="up0", mode=up,
                                   coordinate_transformation_mode="asymmetric" if up == "nearest" else "half_pixel",
                                   nearest_mode="floor"))
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", **same),
             helper.make_node("Relu", ["c0"], ["skip"], name="relu0"),
             helper.make_node("MaxPool", ["skip"], ["p0"], name="pool0", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p0", "w1"], ["c1"], name="conv1", **same),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             upsampling,
             helper.make_node("Concat", ["skip", "u"], ["cat"], name="concat0", axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["c2"], name="conv2", **same),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "unet_block", [helper.make_tensor_value_info("x", F, [1, 3, 192, 192])],
                              [helper.make_tensor_value_info("y", F, None)],
                              [numpy_helper.from_array(v, n) for n, v in weights.items()
                               if n != ("up" if up != "ConvTranspose" else "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(("prepack", "up"), [(True, "ConvTranspose"), (False, "ConvTranspose"), (True, "nearest"),
                                             (True, "linear"), (False, "linear")])
def test_a_unet_block_runs_in_patches_under_a_cap_it_could_not_meet_whole(tmp_path: Path, prepack: bool,
                                                                          up: str) -> None:
    path = tmp_path / "block.onnx"
    onnx.save(_unet_block(up), str(path))
    whole = hyperion.compile(path, mode="memory_opt", prepack_weights=prepack).schedule.peak_bytes
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(path, memory_limit=1, mode="memory_opt", prepack_weights=prepack)
    smallest = refused.value.smallest_limit_bytes
    assert smallest < whole * 0.6
    cm = hyperion.compile(path, memory_limit=smallest + (64 << 10), mode="memory_opt", prepack_weights=prepack)
    spatial = [s.region for s in cm.schedule.segments if s.region is not None and s.region.patches is not None]
    assert spatial and cm.schedule.peak_bytes <= smallest + (64 << 10)
    patched = {cm.schedule.steps[i].node for s in cm.schedule.segments if s.region is not None
               and s.region.patches is not None for i in s.steps}
    assert "up0" in patched    # the decoder's upsampling runs patch by patch
    feeds = {"x": np.random.default_rng(3).standard_normal([1, 3, 192, 192]).astype(np.float32)}
    expected = reference_outputs(path, feeds, prepack_weights=prepack)
    exact = float64_outputs(_unet_block(up), feeds)
    for _ in range(2):    # the region's one session is kept: the second run reuses it
        actual = cm.run(feeds)
        if prepack:
            assert all(np.array_equal(actual[n], expected[n]) for n in expected)
        else:   # fed weights: the promise of every fed Conv (docs/memory.md)
            assert float_error(actual, exact) <= 2 * float_error(expected, exact)
    saved = tmp_path / "block.schedule.json"
    cm.schedule.save(saved)
    again = hyperion.load(path, saved).run(feeds)
    assert all(np.array_equal(again[n], actual[n]) for n in expected)


def test_an_edited_schedule_whose_patches_read_outside_their_input_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "block.onnx"
    onnx.save(_unet_block(), str(path))
    with pytest.raises(hyperion.MemoryLimitError) as refused:
        hyperion.compile(path, memory_limit=1, mode="memory_opt")
    cm = hyperion.compile(path, memory_limit=refused.value.smallest_limit_bytes + (64 << 10), mode="memory_opt")
    data = json.loads(cm.schedule.to_json())
    segment = next(s for s in data["segments"] if s["region"] is not None and s["region"]["patches"] is not None)
    rows = segment["region"]["patches"]["rows"]
    name = next(iter(rows))
    rows[name][-1][1] += 1                      # one row past the end of the input
    edited = tmp_path / "edited.schedule.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(hyperion.ScheduleError, match=rf"patches: the rows of '{re.escape(name)}' are not"):
        hyperion.load(path, edited)


def test_a_region_is_not_chosen_where_it_strands_a_later_step_over_the_budget() -> None:
    """Steps 0-9 over the budget; step 9 only fits in windows from step 7 on. The window
    0-8 covers the most steps but leaves step 9 none: the region choice takes one that stops
    before step 7, leaving steps 7-9 to a window of their own (``tile_regions._strands``)."""
    def window(start: int, stop: int) -> SimpleNamespace:
        return SimpleNamespace(start=start, stop=stop, steps=frozenset(range(start, stop)))

    best = {step: [(window(0, 9), 1), (window(0, 7), 1)] for step in range(7)}
    best |= {step: [(window(0, 9), 1), (window(7, 10), 1)] for step in (7, 8)}
    best[9] = [(window(7, 10), 1), (window(8, 12), 1)]
    over = set(range(10))
    assert _strands(window(0, 9), best, over, set(), budget=1)  # type: ignore[arg-type]
    assert not _strands(window(0, 7), best, over, set(), budget=1)  # type: ignore[arg-type]
    # A window over the budget itself is no way out.
    assert _strands(window(0, 7), {**best, 9: [(window(7, 10), 2), (window(8, 12), 2)]}, over, set(), budget=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mode", "scale"), [("nearest", 2), ("nearest", 3), ("linear", 2)])
def test_an_opset_9_upsample_patches_bit_for_bit(mode: str, scale: int) -> None:
    """Upsample (onnx's light models are opset 9): asymmetric coordinates, truncated for nearest."""
    chain = _Chain(2, 17, 6, scale)
    chain.conv("x", 3, 3, 1, 1, 1, 1)
    n, c, h, w = chain.shape
    chain.weights["scales"] = np.array([1, 1, scale, 2], np.float32)
    chain._add("Upsample", [chain.last, "scales"], [n, c, h * scale, w * 2], mode=mode)
    chain.conv(chain.last, 2, 3, 1, 1, 1, 1)
    model = chain.model()
    model.opset_import[0].version = 9
    feeds = {"x": chain.rng.standard_normal(chain.input_shape).astype(np.float32)}
    expected = reference_outputs(model.SerializeToString(), feeds)[chain.last]
    region, nodes = _patched_region(model, 3)
    assert region.patches is not None and region.patches.crops   # the Upsample makes more rows than a patch keeps
    session = ort.InferenceSession(patch_model(model, region, nodes).SerializeToString(), session_options(prepack=True),
                                   providers=["CPUExecutionProvider"])
    actual = run_region(session, region, feeds, {chain.last: (expected.dtype, expected.shape)})[0]
    assert np.array_equal(actual, expected), np.abs(actual - expected).max()
