"""The seed's examples without the hand-written parts: the scheduler filled from ONNX.

``fixtures/seed_residual.onnx`` and ``fixtures/seed_attention.onnx`` are the seed's
residual and attention examples as real models, one node per seed layer. No
``add_layer`` and no ``mark_output_unneeded``: dependencies and their types come
from ``classify_edges``, release points from liveness, and every layer runs its
real node in onnxruntime. Run from the repository root:
``python examples/seed_from_onnx.py [seed_residual|seed_attention]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hyperion import ExecutionMode, ForwardScheduler, HyperionError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KB = 1024


def random_feeds(scheduler: ForwardScheduler, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal values for every graph input (the seed fixtures take floats)."""
    rng = np.random.default_rng(seed)
    schedule = scheduler.schedule
    assert schedule is not None
    return {name: rng.standard_normal(schedule.input_shapes[name]).astype(schedule.tensors[name].dtype)
            for name in schedule.graph_inputs}


def main(name: str = "seed_attention", mode: ExecutionMode = ExecutionMode.MEMORY_OPT,
         max_memory: int = 4096 * KB) -> ForwardScheduler:
    scheduler = ForwardScheduler.from_onnx(FIXTURES / f"{name}.onnx", mode, max_memory)
    for layer in scheduler.layers:
        deps = ", ".join(f"{d.layer} ({d.dep_type.value})" for d in layer.dependencies) or "-"
        released = "kept: a model output" if layer.released_after is None else \
            f"released after layer {layer.released_after}"
        print(f"layer {layer.layer_index} {layer.name}: depends on {deps}; {released}")

    scheduler.prepare(random_feeds(scheduler))
    while (layer_index := scheduler.execute_next_layer()) is not None:
        print(f"Executed layer {layer_index}")
        print(f"Current memory usage: {scheduler.memory_usage / KB:.2f} KB")
    print(f"Peak memory usage: {scheduler.peak_memory_usage / KB:.2f} KB")
    for output, value in scheduler.outputs().items():
        print(f"output {output}: shape {list(value.shape)}")
    return scheduler


if __name__ == "__main__":
    try:
        main(*sys.argv[1:2])
    except HyperionError as exc:
        sys.exit(f"error: {exc}")
