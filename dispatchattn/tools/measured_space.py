"""Measuring the compile-pruned config spaces (``tuning/measured_space/<target>.json``) without a GPU.

``python -m dispatchattn measured-space --write`` compiles every candidate tile of every kernel and head dim for
each target of ``measured_space.TARGETS`` (bf16, plain kernels) and writes, per candidate, None (fits) or why it was
rejected.  The runtime reads the verdicts with ``tuning.measured_space``; it never imports this module.
"""

from __future__ import annotations

import itertools
import json
from datetime import date

from ..tuning import measured_space
from ..tuning.config import TileConfig
from . import aot

LAUNCHES = {"fwd": ("fwd",), "bwd": ("bwd_dkdv", "bwd_dq"), "decode": ("decode",)}


def candidates(kernel: str) -> list[TileConfig]:
    """The tiles compiled per kernel: small MMA tiles, 4 to 16 warps, no pipelining (RDNA3 fits only there:
    every 128-row forward tile and every backward tile above 32x32 spilled at D=128)."""
    if kernel == "decode":
        tiles = [(16, n) for n in (16, 32, 64, 128)]
    elif kernel == "bwd":
        tiles = [(m, n) for m in (16, 32) for n in (16, 32)]
    else:
        tiles = [(m, n) for m in (16, 32, 64) for n in (16, 32, 64) if m * n <= 32 * 64]
    return [TileConfig(m, n, warps, 1) for (m, n), warps in itertools.product(tiles, (4, 8, 16))]


def measure(target: str, workers: int = 2) -> dict:
    """Compile every candidate of every kernel and head dim for ``target`` (bf16, plain kernels)."""
    import triton

    jobs, owners = [], []
    for kernel, head_dim in itertools.product(LAUNCHES, measured_space.HEAD_DIMS):
        for config in candidates(kernel):
            for launch in LAUNCHES[kernel]:
                jobs.append(aot.make_job(launch, config, target, "bf16", head_dim))
                owners.append((f"{kernel} d{head_dim}", config))
    reasons: dict[tuple[str, TileConfig], list[str]] = {owner: [] for owner in owners}
    for owner, record in zip(owners, aot.compile_jobs(jobs, workers=workers)):
        reason = aot.reject_reason(record)
        if reason:
            reasons[owner].append(reason)
    document = {
        "target": target,
        "triton": triton.__version__,
        "date": date.today().isoformat(),
        "measured": "bf16, plain kernels (fp16 alike: same element size and instruction)",
        "how": "python -m dispatchattn measured-space --write",
        "verdicts": {},
    }
    for (name, config), found in reasons.items():
        document["verdicts"].setdefault(name, []).append(
            {"config": config.to_dict(), "rejected": "; ".join(found) or None})
    return document


def add_measured_space_parser(subparsers):
    """Add ``measured-space`` to the ``python -m dispatchattn`` subcommands."""
    parser = subparsers.add_parser("measured-space", help="compile the candidate tiles of the measured config spaces",
                                   description="Measure the compile-pruned autotune spaces (no GPU needed).")
    parser.add_argument("--write", action="store_true", help="write tuning/measured_space/<target>.json")
    parser.add_argument("--targets", default=",".join(measured_space.TARGETS), help="comma-separated targets")
    parser.set_defaults(print_help=parser.print_help)
    return parser


def run_measured_space(args) -> int:
    """Run ``python -m dispatchattn measured-space``; without ``--write`` print the help (exit 2)."""
    if not args.write:
        args.print_help()
        return 2
    measured_space.MEASURED_DIR.mkdir(parents=True, exist_ok=True)
    for target in (t for t in args.targets.split(",") if t):
        document = measure(target)
        path = measured_space.MEASURED_DIR / f"{target}.json"
        path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        kept = sum(item["rejected"] is None for items in document["verdicts"].values() for item in items)
        total = sum(len(items) for items in document["verdicts"].values())
        print(f"wrote {path}: {kept} of {total} configs fit")
    measured_space.load.cache_clear()
    return 0
