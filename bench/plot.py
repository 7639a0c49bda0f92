"""Plot the committed benchmark results (bench/results/*.json) as PNGs for docs/performance.md.

    pip install -e ".[bench]"          # matplotlib
    python bench/plot.py               # reads bench/results/, writes docs/img/
    python bench/plot.py --results DIR --out DIR [--include-dry-runs]

Reads what the benchmark scripts write, never anything else:
- ``flex_*.json`` (bench/flex.py): one figure per file and head dim, TFLOP/s against sequence length, a
  panel per case (columns) and direction (rows), one line per backend. CPU dry runs (``"dry_run": true``)
  are skipped unless ``--include-dry-runs``: interpreter timings say nothing about kernels.
- ``overhead*.json`` (bench/overhead.py): one bar chart of microseconds per warm call,
  ``da.attention`` against a direct ``F.scaled_dot_product_attention`` call.
Each figure's title carries the device and the versions recorded in the JSON. Prints every PNG written.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "docs" / "img"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_flex(record: dict, stem: str, out: Path) -> list[Path]:
    """One PNG per head dim: TFLOP/s vs S, a panel per (case, direction), a line per backend."""
    plt = _pyplot()
    by_dim: dict[int, list[dict]] = defaultdict(list)
    for row in record.get("rows", []):
        by_dim[row["head_dim"]].append(row)
    written = []
    for dim, rows in sorted(by_dim.items()):
        cases = sorted({row["case"] for row in rows})
        directions = sorted({row["direction"] for row in rows}, key=lambda d: d != "fwd")  # fwd first
        fig, axes = plt.subplots(
            len(directions), len(cases), figsize=(3.6 * len(cases), 3.0 * len(directions)), squeeze=False
        )
        for (r, direction), (c, case) in ((rd, cc) for rd in enumerate(directions) for cc in enumerate(cases)):
            ax = axes[r][c]
            mine = sorted((x for x in rows if (x["case"], x["direction"]) == (case, direction)), key=lambda x: x["seq"])
            for backend in sorted({b for x in mine for b in x["tflops"]}):
                points = [(x["seq"], x["tflops"][backend]) for x in mine if backend in x["tflops"]]
                ax.plot(*zip(*points), marker="o", label=backend)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{case} {direction}", fontsize="medium")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s (unmasked pairs)")
            ax.legend(fontsize="small")
        fig.suptitle(
            f"{record.get('device')} · {record.get('dtype')} · D={dim} · torch {record.get('torch')}"
            f" · triton {record.get('triton')} · {stem}",
            fontsize="small",
        )
        fig.tight_layout()
        path = out / f"{stem}_d{dim}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_overhead(document: dict, stem: str, out: Path) -> list[Path]:
    """Microseconds per warm call, da.attention vs direct SDPA: one panel per measured shape."""
    plt = _pyplot()
    records = document.get("results", [document])  # {"results": [...]} or one record
    fig, axes = plt.subplots(len(records), 1, figsize=(8.5, 0.4 + 1.6 * len(records)), squeeze=False)
    for ax, record in zip(axes[:, 0], records):
        values = [record["sdpa_us"], record["dispatchattn_us"]]
        ours = record.get("ours_label", "da.attention")  # the metadata-floor record labels its wrapper
        ax.barh(["F.scaled_dot_product_attention", ours], values, color=["tab:gray", "tab:blue"])
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.1f} us", va="center")
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.35)
        paired = ""
        if "paired_ratio_median" in record:  # the per-pair ratio resolves what the two medians cannot
            q1, q3 = record["paired_ratio_quartiles"]
            paired = f"\npaired ratio {record['paired_ratio_median']:.3f} [quartiles {q1:.3f}, {q3:.3f}]"
        ax.set_title(f"{record.get('benchmark', 'dispatch overhead')}, shape {tuple(record.get('shape', ()))}{paired}",
                     fontsize="small")
    axes[-1, 0].set_xlabel("microseconds per warm call (median)")
    first = records[0]
    fig.suptitle(f"{first.get('device')} · torch {first.get('torch')} · {first.get('date')}", fontsize="small")
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_all(results: Path, out: Path, include_dry_runs: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        if path.name.startswith("flex_"):
            if record.get("dry_run") and not include_dry_runs:
                print(f"skipped {path.name}: a CPU dry run")
                continue
            written += plot_flex(record, path.stem, out)
        elif path.name.startswith("overhead"):
            written += plot_overhead(record, path.stem, out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of benchmark JSON (bench/results)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs (docs/img)")
    parser.add_argument("--include-dry-runs", action="store_true")
    args = parser.parse_args(argv)
    written = plot_all(args.results, args.out, args.include_dry_runs)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no benchmark results to plot under {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
