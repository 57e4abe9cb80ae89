"""Only the outputs asked for: ``cm.run(feeds, outputs=[...])`` plans and runs their subgraph alone."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import hyperion
from hyperion.frontend import ancestor_nodes, import_model, load_source, restrict_graph, restrict_to_outputs
from hyperion.ir import TensorRole
from tests.conftest import assert_outputs_equal, example_feeds, fixture_path, reference_outputs

BATCHED = ("dynamic_dims", "encoder_outputs", "demo")


@functools.cache
def _case(name: str, prepack_weights: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    feeds = example_feeds(name, batch=2) if name in BATCHED else example_feeds(name)
    return feeds, reference_outputs(fixture_path(name), feeds, prepack_weights=prepack_weights)


def _requests(outputs: list[str]) -> list[list[str]]:
    """Each output alone, and a pair (the last two, reversed; the one output twice if it is alone)."""
    return [[name] for name in outputs] + [outputs[-2:][::-1] if len(outputs) > 1 else outputs * 2]


@pytest.mark.parametrize("options", [{}, {"mode": "memory_opt", "max_segment_steps": 3}], ids=["default", "segments"])
def test_requested_outputs_match_onnxruntime(fixture_name: str, options: dict) -> None:
    cm = hyperion.compile(fixture_path(fixture_name), **options)
    feeds, _ = _case(fixture_name)
    cm.run(feeds)                                              # planned for these shapes
    _, expected = _case(fixture_name, cm.schedule.packed_kernels)   # with the same GEMM kernels
    everything = list(expected)
    for asked in _requests(everything):
        got = cm.run(feeds, outputs=asked)
        assert list(got) == list(dict.fromkeys(asked))
        assert_outputs_equal(got, {name: expected[name] for name in asked})
        schedule = cm.schedule
        needed = set(ancestor_nodes(cm.base_ir, asked))
        assert {step.node for step in schedule.steps} <= needed, "a step outside the outputs' ancestors"
        if set(asked) != set(everything):
            assert set(schedule.graph_outputs) == set(asked)
            assert not schedule.whole_model
            produced = {t for step in schedule.steps for t in step.outputs}
            held = {n for n, t in schedule.tensors.items() if t.role is not TensorRole.WEIGHT and t.producer}
            assert held <= produced
    assert_outputs_equal(cm.run(feeds), expected)  # and every output again, from the full plan
    assert set(cm.schedule.graph_outputs) == set(everything)


def test_pruned_plans_are_cached_per_output_set_and_shapes() -> None:
    cm = hyperion.compile(fixture_path("dynamic_dims"), memory_limit="1MB")
    two, three = example_feeds("dynamic_dims", batch=2), example_feeds("dynamic_dims", batch=3)
    cm.run(two, outputs=["logits"])
    first = cm.schedule
    cm.run(three, outputs=["logits"])
    assert cm.schedule is not first and cm.schedule.input_shapes["input_ids"] == (3, 8)
    cm.run(two, outputs=["logits"])
    assert cm.schedule is first
    cm.run(two, outputs=["tokens_doubled"])
    assert cm.schedule.graph_outputs == ("tokens_doubled",) and len(cm.schedule.steps) == 1
    cm.run(two, outputs=["tokens_doubled", "logits"])  # every output: the full plan
    assert len(cm.schedule.steps) == 6
    assert len(cm._pruned) == 3


def test_extra_outputs_are_not_held() -> None:
    """Asking for logits alone: hidden states and attention maps are freed after their last
    use instead of living to the end of the run, so the plan peaks lower."""
    feeds = example_feeds("encoder_outputs", batch=4)
    cm = hyperion.compile(fixture_path("encoder_outputs"))
    full = cm.run(feeds)
    full_peak = cm.schedule.peak_bytes
    got = cm.run(feeds, outputs=["logits"])
    np.testing.assert_allclose(got["logits"], full["logits"], rtol=1e-5, atol=1e-6)
    assert cm.schedule.peak_bytes < full_peak
    cm.run(feeds, outputs=["hidden_state_1"])
    assert not any(step.node.startswith("layer2.") for step in cm.schedule.steps)


def test_outputs_under_a_cap_the_full_model_does_not_meet() -> None:
    """A cap too small for every output can be enough for one of them."""
    feeds = example_feeds("encoder_outputs", batch=8)
    shapes = {"input_ids": [8, 8]}
    full_peak = hyperion.compile(fixture_path("encoder_outputs"), input_shapes=shapes,
                                 mode="memory_opt").schedule.peak_bytes
    cm = hyperion.compile(fixture_path("encoder_outputs"), input_shapes=shapes, mode="memory_opt")
    cm.run(feeds, outputs=["hidden_state_0"])
    small = cm.schedule.peak_bytes
    assert small < full_peak
    capped = hyperion.compile(fixture_path("encoder_outputs"), memory_limit=(small + full_peak) // 2,
                              mode="memory_opt", input_shapes=None)
    got = capped.run(feeds, outputs=["hidden_state_0"])
    assert capped.schedule.peak_bytes <= (small + full_peak) // 2
    np.testing.assert_allclose(got["hidden_state_0"], _run_all(feeds)["hidden_state_0"], rtol=1e-5, atol=1e-6)


def _run_all(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return reference_outputs(fixture_path("encoder_outputs"), feeds)


def test_streaming_runs_requested_outputs_in_chunks() -> None:
    feeds = example_feeds("encoder_outputs", batch=4)
    cm = hyperion.compile(fixture_path("encoder_outputs"), mode="streaming")
    got = cm.run(feeds, outputs=["logits", "hidden_state_2"])
    assert cm.schedule.streaming is not None
    expected = _run_all(feeds)
    assert_outputs_equal(got, {"logits": expected["logits"], "hidden_state_2": expected["hidden_state_2"]})


def test_loaded_schedule_runs_requested_outputs(tmp_path) -> None:
    feeds, expected = _case("encoder_outputs")
    compiled = hyperion.compile(fixture_path("encoder_outputs"), input_shapes={"input_ids": [2, 8]})
    saved = compiled.schedule.save(tmp_path / "encoder.schedule.json")
    loaded = hyperion.load(fixture_path("encoder_outputs"), saved)
    got = loaded.run(feeds, outputs=["attentions_1"])
    assert_outputs_equal(got, {"attentions_1": expected["attentions_1"]})
    assert loaded.schedule.graph_outputs == ("attentions_1",)


def test_unknown_output_is_a_feed_error() -> None:
    cm = hyperion.compile(fixture_path("dynamic_dims"))
    with pytest.raises(hyperion.FeedError, match="no output named 'nope'"):
        cm.run(example_feeds("dynamic_dims"), outputs=["nope"])
    with pytest.raises(hyperion.FeedError, match="list of output names"):
        cm.run(example_feeds("dynamic_dims"), outputs="logits")


def test_restrict_graph() -> None:
    imported = import_model(load_source(fixture_path("encoder_outputs")), {"input_ids": [1, 8]})
    graph = imported.graph
    small = restrict_graph(graph, ["hidden_state_1", "hidden_state_0"])
    assert small.outputs == ("hidden_state_1", "hidden_state_0")
    assert small.inputs == graph.inputs
    assert set(small.nodes) == set(ancestor_nodes(graph, ["hidden_state_1"]))
    assert small.tensors["hidden_state_1"].role is TensorRole.OUTPUT
    assert small.tensors["attentions_1"].role is TensorRole.ACTIVATION  # an output not asked for
    assert "classifier.weight" not in small.tensors
    assert all(c in small.nodes for t in small.tensors.values() for c in t.consumers)
    small.verify()
    assert restrict_to_outputs(imported, reversed(graph.outputs)) is imported  # every output: unchanged
    with pytest.raises(hyperion.OptionError, match="no output named"):
        restrict_graph(graph, ["embeddings_out"])


def test_traced_run_of_requested_outputs(tmp_path) -> None:
    feeds, expected = _case("encoder_outputs")
    cm = hyperion.compile(fixture_path("encoder_outputs"), memory_limit="1MB")
    got = cm.run(feeds, trace=tmp_path / "run.json", outputs=["logits"])
    assert_outputs_equal(got, {"logits": expected["logits"]})
    assert (tmp_path / "run.json").stat().st_size > 0
