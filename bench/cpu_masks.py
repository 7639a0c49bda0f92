"""Masked attention on CPU: SDPA with a dense mask vs compiled FlexAttention, the trade-off the selector makes.

    python bench/cpu_masks.py [--seqs 1024 2048 4096] [--json bench/results/cpu-masks.json]

For each mask and length: the warm time of ``da.attention`` forced to ``sdpa`` (its dense mask is built once
and cached, as on repeated calls) and to ``torch_flex`` (compiled; its first call, which compiles, is timed
separately), their ratio, and which backend the automatic choice takes.  Medians of interleaved rounds,
float32, (1, 8, S, 64), forward only (FlexAttention has no CPU backward).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch

import dispatchattn as da

MASKS = {
    "causal": lambda s: da.masks.causal(),
    "sliding_window_256": lambda s: da.masks.sliding_window(256) & da.masks.causal(),
    "document_8": lambda s: da.masks.document(torch.arange(s) * 8 // s) & da.masks.causal(),
}


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(mask_name: str, seq: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, seq, 64, generator=gen) for _ in range(3))
    mask = MASKS[mask_name](seq)
    calls = {name: (lambda name=name: da.attention(q, k, v, mask_mod=mask, backend=name))
             for name in ("sdpa", "torch_flex")}
    first = {name: _once(fn) for name, fn in calls.items()}  # torch_flex compiles here; sdpa builds its mask
    torch.testing.assert_close(calls["sdpa"](), calls["torch_flex"](), atol=2e-5, rtol=2e-5)
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples[name].append(_once(fn))
    median = {name: statistics.median(s) for name, s in samples.items()}
    return {
        "mask": mask_name, "shape": [1, 8, seq, 64], "dtype": "float32",
        "sdpa_ms": median["sdpa"] * 1e3, "torch_flex_ms": median["torch_flex"] * 1e3,
        "sdpa_over_torch_flex": median["sdpa"] / median["torch_flex"],
        "first_call_s": {name: round(t, 2) for name, t in first.items()},
        "automatic_choice": da.explain(q, k, v, mask_mod=mask).backend,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--masks", nargs="*", default=list(MASKS), choices=list(MASKS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    rows = []
    print(f"{'mask':<20}{'S':>6}{'sdpa ms':>10}{'flex ms':>10}{'sdpa/flex':>11}{'flex 1st s':>12}  automatic")
    for mask_name in args.masks:
        for seq in args.seqs:
            r = measure(mask_name, seq, args.rounds)
            rows.append(r)
            first = r["first_call_s"]["torch_flex"]
            print(f"{mask_name:<20}{seq:>6}{r['sdpa_ms']:>10.1f}{r['torch_flex_ms']:>10.1f}"
                  f"{r['sdpa_over_torch_flex']:>11.2f}{first:>12.1f}  {r['automatic_choice']}")
    meta = {
        "benchmark": "CPU masked attention: sdpa (dense mask, cached) vs torch_flex (compiled)",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "dispatchattn": da.__version__, "date": date.today().isoformat(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
