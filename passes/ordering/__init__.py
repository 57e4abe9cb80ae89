"""Choosing the order steps run in: the order pass and the search behind it."""
