"""The seed's "Example with Attention Mechanism", ported line by line.

Sizes are those of one transformer layer with 128 tokens of width 512 in float32:
every activation is 256 KiB except the feed-forward one, four times wider (1 MiB).
Run from the repository root: ``python examples/seed_attention.py``.
"""

from __future__ import annotations

import sys

from hyperion import DependencyType, ExecutionMode, ForwardScheduler, HyperionError

MB = 1024 * 1024
SEQ_LEN, HIDDEN, FLOAT_BYTES = 128, 512, 4

# 256 KiB each
embed_size = q_size = k_size = v_size = att_size = norm_size = out_size = SEQ_LEN * HIDDEN * FLOAT_BYTES
ffn_size = SEQ_LEN * 4 * HIDDEN * FLOAT_BYTES  # 1 MiB


def build(max_memory: int = 100 * MB) -> ForwardScheduler:
    scheduler = ForwardScheduler(None, ExecutionMode.MEMORY_OPT, max_memory)

    # Input embedding
    scheduler.add_layer(0, -1, DependencyType.NONE, embed_size)

    # Self-attention layers
    scheduler.add_layer(1, 0, DependencyType.SEQUENTIAL, q_size)  # Query
    scheduler.add_layer(2, 0, DependencyType.SEQUENTIAL, k_size)  # Key
    scheduler.add_layer(3, 0, DependencyType.SEQUENTIAL, v_size)  # Value

    # Attention mechanism (depends on Q, K, V)
    scheduler.add_layer(4, 1, DependencyType.ATTENTION, att_size)  # Attention
    scheduler.add_layer(4, 2, DependencyType.ATTENTION, att_size)  # (same layer)
    scheduler.add_layer(4, 3, DependencyType.ATTENTION, att_size)  # (same layer)

    # Residual connection and layer norm (depends on input and attention)
    scheduler.add_layer(5, 0, DependencyType.RESIDUAL, norm_size)    # Residual
    scheduler.add_layer(5, 4, DependencyType.SEQUENTIAL, norm_size)  # (same layer)

    # Feed-forward network
    scheduler.add_layer(6, 5, DependencyType.SEQUENTIAL, ffn_size)  # FFN

    # Final residual and layer norm
    scheduler.add_layer(7, 5, DependencyType.RESIDUAL, out_size)    # Output
    scheduler.add_layer(7, 6, DependencyType.SEQUENTIAL, out_size)  # (same layer)
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
