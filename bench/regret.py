"""Regret of the automatic choice: time(auto) / time(fastest backend), over a grid of problems.

    python bench/regret.py [--quick] [--json bench/results/regret-cpu.json] [--plot regret-cpu.png]

For every problem, each backend that can run it is forced (``backend=X``) and timed; then ``auto`` is timed in
each mode:

- ``rule``: no ranking anywhere (the shipped rankings hidden, an empty cache): the default priority decides;
- ``shipped`` (GPUs with a shipped ranking for their architecture): the shipped ranking, no user measurement;
- ``measured``: after ``DISPATCHATTN_AUTOTUNE``-style measurement on this device (``measured.measure_and_record``,
  a separate run from the forced timings below, as a user's first call would do).

Regret = time(auto in that mode) / time(fastest forced backend), forward (and forward + backward where the
problem needs grad).  Prints a table and the median and worst regret per mode; ``--json`` saves the rows with
device and versions, ``--plot`` draws them (matplotlib).  On CPU the grid is float32 (1, 8, S, 64), S 1k-4k, causal /
sliding window 256 / 8 documents (sdpa, reference and torch_flex; torch_flex has no CPU backward); on a GPU it is the
H200 grid of ``python -m dispatchattn tune --backends``.  Timings are medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import dispatchattn as da
from dispatchattn import api, capabilities, measured
from dispatchattn.backends.base import random_call
from dispatchattn.decide import exclusions
from dispatchattn.selector import Policy, select
from dispatchattn.timing import sync
from dispatchattn.tools.tune_backends import grid
from dispatchattn.tuning import rankings

ROOT = Path(__file__).resolve().parent.parent


def _inputs(spec, device):
    """Random inputs of ``spec``'s shapes, and the ``da.attention`` keywords that make the same call."""
    torch.manual_seed(0)
    call = random_call(spec, device, requires_grad=spec.requires_grad)
    kwargs = dict(is_causal=spec.is_causal, mask_mod=call.mask_mod, score_mod=call.score_mod,
                  enable_gqa=spec.enable_gqa)
    return (call.query, call.key, call.value), kwargs


def _call(qkv, kwargs, backend, grad):
    def run():
        out = da.attention(*qkv, **kwargs, backend=backend)
        if grad:
            torch.autograd.grad(out, qkv, torch.ones_like(out))
    return run


def _time_round_robin(calls: dict, device, rounds: int) -> dict[str, float]:
    """Median ms of each call, sampled in interleaved rounds (drift hits every call alike)."""
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


class _Mode:
    """Switch the ranking sources for one mode: an empty cache directory, the shipped rankings hidden or not."""

    def __init__(self, cache: Path, shipped: bool):
        self.cache, self.shipped = cache, shipped

    def __enter__(self):
        self.saved = (os.environ.get("DISPATCHATTN_CACHE_DIR"), rankings.SHIPPED_DIR)
        os.environ["DISPATCHATTN_CACHE_DIR"] = str(self.cache)
        if not self.shipped:
            rankings.SHIPPED_DIR = self.cache / "no-shipped-rankings"
        rankings.clear_memory()
        api.clear_memo()
        return self

    def __exit__(self, *exc):
        cache, rankings.SHIPPED_DIR = self.saved
        if cache is None:
            os.environ.pop("DISPATCHATTN_CACHE_DIR", None)
        else:
            os.environ["DISPATCHATTN_CACHE_DIR"] = cache
        rankings.clear_memory()
        api.clear_memo()


def bench_problem(name, spec, device, caps, rounds, work: Path, modes) -> dict:
    qkv, kwargs = _inputs(spec, device)
    grad = spec.requires_grad
    with _Mode(work / "rule", shipped=False):
        eligible = select(spec, caps, Policy(), None, exclusions(spec, caps)).eligible
    skipped = [n for n in eligible if measured.skip_reason(n, caps)]
    forced = {n: _call(qkv, kwargs, n, grad) for n in eligible if n not in skipped}
    choice, first = {}, {}
    for mode in modes:
        cache = work / f"{mode}-{name.replace(' ', '_')}"
        with _Mode(cache, shipped=mode == "shipped"):
            if mode == "measured":
                measured.measure_and_record(spec, caps, eligible, device)
            choice[mode] = da.explain(*qkv, **kwargs).backend
    for fn_name, fn in forced.items():  # first calls (compiles) outside the timed rounds
        start = time.perf_counter()
        fn()
        sync(device)
        first[fn_name] = time.perf_counter() - start
    times = _time_round_robin(forced, device, rounds)
    fastest = min(times, key=times.get)
    row = {"problem": name, "bucket": rankings.bucket(spec), "times_ms": times, "first_call_s": first,
           "fastest": fastest, "skipped": skipped}
    for mode, backend in choice.items():
        row[f"auto_{mode}"] = backend
        row[f"regret_{mode}"] = times[backend] / times[fastest] if backend in times else None
    return row


def summarise(rows: list[dict], modes) -> dict:
    out = {}
    for mode in modes:
        values = [r[f"regret_{mode}"] for r in rows if r.get(f"regret_{mode}") is not None]
        if values:
            out[mode] = {"median": statistics.median(values), "worst": max(values), "problems": len(values)}
    return out


def print_table(rows: list[dict], modes) -> None:
    names = sorted({n for r in rows for n in r["times_ms"]})
    print("problem".ljust(28) + "".join(n.rjust(12) for n in names) + "".join(f"  {m}".ljust(22) for m in modes))
    for r in rows:
        cells = "".join((f"{r['times_ms'][n]:.3f}" if n in r["times_ms"] else "-").rjust(12) for n in names)
        picks = "".join(f"  {r[f'auto_{m}']} {r[f'regret_{m}'] or float('nan'):.2f}".ljust(22) for m in modes)
        print(r["problem"].ljust(28) + cells + picks)


def plot(rows: list[dict], modes, path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.6), 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [r.get(f"regret_{mode}") or 0 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=mode)
    ax.axhline(1.05, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([r["problem"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("time(auto) / time(fastest)")
    ax.set_title(f"dispatchattn regret on {device_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first problems only, few rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per backend (default 15 GPU, 5 CPU)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    caps = capabilities.probe(device)
    problems = list(grid(device))
    if device.type == "cpu":  # training calls too, where only sdpa and reference have a backward
        problems += [(f"{n} fwd+bwd", dataclasses.replace(s, requires_grad=True)) for n, s in problems[:6]]
    if args.quick:
        problems = problems[:3]
    rounds = args.rounds or (3 if args.quick else 15 if device.type == "cuda" else 5)
    modes = ["rule"] + (["shipped"] if caps.arch and rankings.shipped_document(caps.arch) else []) + ["measured"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dispatchattn-regret-") as work:
        for name, spec in problems:
            row = bench_problem(name, spec, device, caps, rounds, Path(work), modes)
            rows.append(row)
            print(f"{name}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in row["times_ms"].items())
                  + "; " + ", ".join(f"{m}: {row[f'auto_{m}']}" for m in modes), file=sys.stderr, flush=True)
    print_table(rows, modes)
    summary = summarise(rows, modes)
    for mode, s in summary.items():
        print(f"{mode}: median regret {s['median']:.3f}, worst {s['worst']:.3f} over {s['problems']} problems")
    if args.json:
        result = {"what": "time(auto) / time(fastest forced backend), medians of interleaved rounds",
                  "date": date.today().isoformat(), "device": caps.to_dict(),
                  "host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                  "rounds": rounds, "summary": summary, "rows": rows}
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, modes, args.plot, caps.describe())
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
