"""Tile configs for the in-house Triton kernels: config space, on-disk cache, shipped defaults."""
