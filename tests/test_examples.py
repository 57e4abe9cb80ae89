"""The seed's examples ported to Python: they run, their memory figures are the ones worked
out by hand, the automatic ONNX versions agree with them, and the docs' code runs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from types import ModuleType

import pytest

from hyperion import ForwardScheduler
from tests.conftest import REPO, assert_outputs_equal, example_feeds, fixture_path, reference_outputs

KIB, MIB = 1024, 1024 * 1024


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples.{name}", REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name: str, *args: object) -> tuple[ForwardScheduler, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        scheduler = load_example(name).main(*args)
    return scheduler, printed.getvalue()


def printed_usage(text: str, unit: int) -> list[float]:
    return [float(v) * unit for v in re.findall(r"Current memory usage: ([\d.]+)", text)]


def test_seed_sequential_example() -> None:
    scheduler, text = run_main("seed_sequential")
    # 8 layers (external_data.onnx has 8 nodes) of 1 MiB, each read only by the next.
    # Layer i runs holding layer i-1's output and its own: 1 + 1 = 2 MiB, the peak. Right
    # after it, liveness releases layer i-1, so 1 MiB is held after every layer, and the
    # last output (the result) stays: 1 MiB at the end.
    assert [int(i) for i in re.findall(r"Executed layer (\d+)", text)] == list(range(8))
    assert printed_usage(text, MIB) == [1 * MIB] * 8
    assert scheduler.peak_memory_usage == 2 * MIB
    assert scheduler.memory_usage == 1 * MIB
    assert "Peak memory usage: 2.00 MB" in text
    assert [layer.released_after for layer in scheduler.layers] == [1, 2, 3, 4, 5, 6, 7, None]


def test_seed_residual_example() -> None:
    scheduler, text = run_main("seed_residual")
    # sizes 0..4 = 4, 1, 2, 3, 5 MiB; held after each layer (after liveness releases):
    #   0: L0                    = 4
    #   1: L0 + L1               = 5
    #   2: L0 + L1 + L2 = 7, then L1 is released (last read by 2) -> 4 + 2      = 6
    #   3: L0 + L2 + L3 = 9, then L0 is released (last read by 3) -> 2 + 3      = 5
    #   4: L2 + L3 + L4 = 10 (the peak), then L2, L3 are released -> L4         = 5
    assert printed_usage(text, MIB) == [4 * MIB, 5 * MIB, 6 * MIB, 5 * MIB, 5 * MIB]
    assert scheduler.peak_memory_usage == 10 * MIB
    assert scheduler.memory_usage == 5 * MIB
    assert "Peak memory usage: 10.00 MB" in text


def test_seed_attention_example() -> None:
    scheduler, text = run_main("seed_attention")
    # every activation 128 x 512 x 4 B = 256 KiB, the FFN's 1024 KiB. Held after each layer:
    #   0: E = 256; 1: E+Q = 512; 2: +K = 768; 3: +V = 1024
    #   4: E+Q+K+V+A = 1280 while it runs, then Q, K, V released -> E + A = 512
    #   5: E+A+N = 768, then E, A released -> N = 256
    #   6: N+F = 256 + 1024 = 1280 (N is still read by 7)
    #   7: N+F+O = 1536 (the peak), then N, F released -> O = 256
    assert printed_usage(text, MIB) == [k * KIB for k in (256, 512, 768, 1024, 512, 256, 1280, 256)]
    assert scheduler.peak_memory_usage == 1536 * KIB
    assert scheduler.memory_usage == 256 * KIB
    assert "Peak memory usage: 1.50 MB" in text


@pytest.mark.parametrize("name", ["seed_residual", "seed_attention"])
def test_hand_and_onnx_schedules_agree(name: str) -> None:
    """The seed's example by hand and the same network as ONNX, planned by the same core."""
    by_hand = load_example(name).build()
    by_hand.prepare()
    automatic = ForwardScheduler.from_onnx(fixture_path(name))
    assert len(by_hand.layers) == len(automatic.layers)
    for hand, auto in zip(by_hand.layers, automatic.layers, strict=True):
        assert hand.layer_index == auto.layer_index
        assert hand.dependencies == auto.dependencies, f"layer {hand.layer_index}"
        assert (hand.depends_on_layer, hand.dep_type) == (auto.depends_on_layer, auto.dep_type)
        assert hand.released_after == auto.released_after, f"layer {hand.layer_index}"
    assert released_per_step(by_hand) == released_per_step(automatic)


def released_per_step(scheduler: ForwardScheduler) -> list[list[int]]:
    """For every step, the layers whose outputs liveness releases right after it."""
    producer = {t: layer.index for layer in scheduler.plan.layers for t in layer.outputs}
    return [sorted(producer[t] for t in names if t in producer) for names in scheduler.plan.frees]


def test_hand_and_onnx_sequential_schedules_agree() -> None:
    by_hand, _ = run_main("seed_sequential")
    automatic = ForwardScheduler.from_onnx(fixture_path("external_data"))
    assert [(layer.dependencies, layer.released_after) for layer in by_hand.layers] == \
        [(layer.dependencies, layer.released_after) for layer in automatic.layers]


@pytest.mark.parametrize("name", ["seed_residual", "seed_attention"])
def test_seed_from_onnx_example(name: str) -> None:
    scheduler, text = run_main("seed_from_onnx", name)
    assert "Peak memory usage" in text and "kept: a model output" in text
    assert scheduler.schedule is not None
    feeds = load_example("seed_from_onnx").random_feeds(scheduler)
    expected = reference_outputs(fixture_path(name), feeds, prepack_weights=scheduler.schedule.packed_kernels)
    assert_outputs_equal(scheduler.outputs(), expected)
    assert example_feeds(name)["x"].shape == feeds["x"].shape


def docs_code_blocks() -> list[str]:
    text = (REPO / "docs" / "seed_api.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_have_runnable_examples() -> None:
    assert len(docs_code_blocks()) >= 7  # hand and automatic for each of the three, batch size


@pytest.mark.parametrize("index", range(len(docs_code_blocks())))
def test_docs_code_block_runs(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the blocks use paths from the repository root
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(docs_code_blocks()[index], f"docs/seed_api.md block {index}", "exec"), {})
