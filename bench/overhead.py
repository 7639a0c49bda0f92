"""Dispatch overhead: a warm ``da.attention`` call vs a direct ``F.scaled_dot_product_attention`` call.

Both run on the same inputs, interleaved in rounds so that machine noise hits both alike; the figures
are medians.  Target (CPU, (1, 8, 128, 64) fp32): ratio <= 1.05, i.e. <= ~3 us added per call.

    python bench/overhead.py [--json bench/results/overhead-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F

import dispatchattn as da


def _per_call(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def measure(shape=(1, 8, 128, 64), rounds: int = 31, inner: int = 200) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    ours = lambda: da.attention(q, k, v, is_causal=True)  # noqa: E731
    direct = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    assert torch.equal(ours(), direct())
    for fn in (ours, direct):
        _per_call(fn, inner)
    ours_s, direct_s = [], []
    for _ in range(rounds):
        ours_s.append(_per_call(ours, inner))
        direct_s.append(_per_call(direct, inner))
    ours_med, direct_med = statistics.median(ours_s), statistics.median(direct_s)
    return {
        "benchmark": "eager dispatch overhead",
        "shape": list(shape), "dtype": "float32", "is_causal": True,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backend": da.explain(q, k, v, is_causal=True).backend,
        "torch": torch.__version__, "dispatchattn": da.__version__, "date": date.today().isoformat(),
        "dispatchattn_us": ours_med * 1e6, "sdpa_us": direct_med * 1e6,
        "added_us": (ours_med - direct_med) * 1e6, "ratio": ours_med / direct_med,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--inner", type=int, default=200)
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    result = measure(rounds=args.rounds, inner=args.inner)
    print(f"{'call':<28}{'median us':>12}")
    print(f"{'da.attention (warm)':<28}{result['dispatchattn_us']:>12.2f}")
    print(f"{'F.scaled_dot_product_attention':<28}{result['sdpa_us']:>12.2f}")
    print(f"added {result['added_us']:.2f} us per call, ratio {result['ratio']:.3f} (target <= 1.05)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
