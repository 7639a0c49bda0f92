"""Wall-clock timing used by the CLI and the benchmark scripts: medians after warm-up, synchronised."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int = 30, warmup: int = 3,
                   device: torch.device | None = None, inner: int = 1) -> float:
    """Median over ``repeats`` samples of the time of ``inner`` back-to-back calls of ``fn``, per call."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)
