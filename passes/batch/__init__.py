"""Batch separability: whether the batch can be split along axis 0, and the per-op rules."""
