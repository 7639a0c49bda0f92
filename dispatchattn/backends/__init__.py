"""Backends: one file each (the in-house Triton kernel: one folder)."""
