"""The seed's "Example with Residual Connections", ported line by line.

Layer 4 (Output) reads Conv2 (layer 2) and the residual branch (layer 3); the
residual branch reads the input layer (0), so layer 0's output is held until
layer 3 has run. Run from the repository root: ``python examples/seed_residual.py``.
"""

from __future__ import annotations

import sys

from hyperion import DependencyType, ExecutionMode, ForwardScheduler, HyperionError

MB = 1024 * 1024

# Activation sizes of the five layers (distinct, so each term of the peak is visible).
size0, size1, size2, size3, size4 = 4 * MB, 1 * MB, 2 * MB, 3 * MB, 5 * MB


def build(max_memory: int = 100 * MB) -> ForwardScheduler:
    scheduler = ForwardScheduler(None, ExecutionMode.MEMORY_OPT, max_memory)

    # Main branch
    scheduler.add_layer(0, -1, DependencyType.NONE, size0)        # Input layer
    scheduler.add_layer(1, 0, DependencyType.SEQUENTIAL, size1)   # Conv1
    scheduler.add_layer(2, 1, DependencyType.SEQUENTIAL, size2)   # Conv2

    # Residual connection (depends on input layer)
    scheduler.add_layer(3, 0, DependencyType.RESIDUAL, size3)     # Residual

    # Output layer (depends on both Conv2 and Residual)
    scheduler.add_layer(4, 2, DependencyType.SEQUENTIAL, size4)   # Output
    scheduler.add_layer(4, 3, DependencyType.SEQUENTIAL, size4)   # Output (same layer)
    return scheduler


def run(scheduler: ForwardScheduler) -> ForwardScheduler:
    scheduler.prepare()
    while (layer_index := scheduler.execute_next_layer()) is not None:
        print(f"Executed layer {layer_index}")
        print(f"Current memory usage: {scheduler.memory_usage / MB:.2f} MB")
    print(f"Peak memory usage: {scheduler.peak_memory_usage / MB:.2f} MB")
    return scheduler


def main() -> ForwardScheduler:
    return run(build())


if __name__ == "__main__":
    try:
        main()
    except HyperionError as exc:
        sys.exit(f"error: {exc}")
