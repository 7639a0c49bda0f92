"""bench/overhead.py runs and records what docs/performance.md quotes (the timing itself is not asserted: CI
machines are too noisy for that; the figures come from a quiet run of the script)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "bench" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eager_record(overhead):
    record = overhead.measure(shape=(1, 2, 16, 8), rounds=3, inner=5)
    assert record["backend"] == "sdpa"  # the figure is the dispatch cost in front of the same kernel
    assert record["shape"] == [1, 2, 16, 8] and record["dtype"] == "float32"
    assert record["dispatchattn_us"] > 0 and record["sdpa_us"] > 0
    assert record["ratio"] == pytest.approx(record["dispatchattn_us"] / record["sdpa_us"])
    assert record["added_us"] == pytest.approx(record["dispatchattn_us"] - record["sdpa_us"])


def test_compiled_record(overhead):
    record = overhead.measure_compiled(shape=(1, 2, 16, 8), rounds=3, inner=5)
    assert record["benchmark"].startswith("compiled") and record["ratio"] > 0
