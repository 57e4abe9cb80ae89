"""The seed's usage example, ported line by line: a sequential network of 1 MB layers.

Run from the repository root: ``python examples/seed_sequential.py``. The layers are
described by hand, as in the seed, so they are planned from their sizes alone; the
model only gives the layer count. ``seed_from_onnx.py`` shows the same scheduler
filled from the model itself, without the hand-written parts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hyperion import (
    DependencyType,
    ExecutionMode,
    ForwardScheduler,
    HyperionError,
    default_mmap_config,
    open_mapped_model,
)

# A model whose weights live in an external data file, like the seed's large_model.tmai.
MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "external_data.onnx"
MB = 1024 * 1024


def is_output_needed_by_future_layers(layer_index: int) -> bool:
    """The seed's placeholder. Hyperion's liveness has already released the output after
    its last reader, so the mark it guards changes nothing here."""
    return False


def main(model_path: Path = MODEL) -> ForwardScheduler:
    # Open model with memory mapping
    mmap_config = default_mmap_config()
    mmap_config.max_cache_size = 50 * MB  # 50MB cache

    # Failures raise a HyperionError instead of returning NULL / false.
    with open_mapped_model(model_path, mmap_config) as model:
        # Create scheduler with memory limit
        scheduler = ForwardScheduler(model, ExecutionMode.MEMORY_OPT, 100 * MB)  # 100MB limit

        # Get layer count from the model
        layer_count = model.layer_count

        # Add layers to the schedule (sequential network example)
        for i in range(layer_count):
            depends_on = i - 1 if i > 0 else -1
            dep_type = DependencyType.SEQUENTIAL if i > 0 else DependencyType.NONE
            output_size = 1 * MB  # 1MB per layer
            scheduler.add_layer(i, depends_on, dep_type, output_size)

        # Prepare for execution
        scheduler.prepare()

        # Execute the network layer by layer
        while (layer_index := scheduler.execute_next_layer()) is not None:
            print(f"Executed layer {layer_index}")
            print(f"Current memory usage: {scheduler.memory_usage / MB:.2f} MB")

            # The seed's hand-written release; a no-op now (see the placeholder above).
            if layer_index > 0 and not is_output_needed_by_future_layers(layer_index - 1):
                scheduler.mark_output_unneeded(layer_index - 1)

        # Print peak memory usage
        print(f"Peak memory usage: {scheduler.peak_memory_usage / MB:.2f} MB")
    return scheduler


if __name__ == "__main__":
    try:
        main()
    except HyperionError as exc:
        sys.exit(f"error: {exc}")
