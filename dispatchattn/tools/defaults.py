"""Regenerating the shipped default tile configs (``tuning/defaults/<target>.json``) without a GPU.

``python -m dispatchattn defaults --write`` rewrites the unmeasured files from the heuristic;
``--compile-check`` compiles each entry for its target (``compile_check.py``) and ships the largest tile that
fits.  The runtime reads the files with ``tuning.shipped``; it never imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..tuning import shipped
from ..tuning.config import TileConfig
from ..vendor_tables import AOT_TARGETS
from . import aot, aot_cache
from .compile_check import ALL_VARIANTS, compile_copied, copy_checked, verify_document


def same_configs(old: dict, new: dict) -> bool:
    """Whether ``new`` holds ``old``'s configs (ignoring dates, versions, and ``old``'s entries that an
    ahead-of-time compile checked and changed)."""
    if set(old["tile_configs"]) != set(new["tile_configs"]):
        return False
    return all(
        entry["config"] == new["tile_configs"][name]["config"]
        for name, entry in old["tile_configs"].items()
        if "checked" not in entry
    )


def _with_float16(dtypes: Iterable[str]) -> set[str]:
    """The dtypes a compile check of ``dtypes`` settles: float16 takes bfloat16's result."""
    return {*dtypes, *(["float16"] if "bfloat16" in dtypes else [])}


def _checked_by_dtype(old: dict | None, compiled: set[str], variants_checked: list[str],
                      pythons: Iterable[str | None]) -> dict[str, dict]:
    """Per checked dtype, what its entries were compiled with: ``variants``, the Triton versions (``tritons``) and the
    ahead-of-time record format (``aot_format``; 2 and later compile as a launch specialises the arguments).  The
    ``compiled`` dtypes get this run's; the others what ``old`` recorded (a file from before this record: its
    ``variants_checked``, the Triton it was produced with, format 1)."""
    produced = (old or {}).get("produced", {})
    earlier = produced.get("checked_by_dtype") or {
        dtype: {"variants": produced.get("variants_checked", ["plain"]), "tritons": [produced.get("triton", "?")],
                "aot_format": 1}
        for dtype in produced.get("dtypes_checked", [])}
    now = {"variants": variants_checked, "tritons": list(dict.fromkeys(aot_cache.triton_version(p) for p in pythons)),
           "aot_format": aot.FORMAT_VERSION}
    found = {dtype: (now if dtype in compiled else earlier.get(dtype)) for dtype in ("bfloat16", "float16", "float32")}
    return {dtype: record for dtype, record in found.items() if record}


def _kept_checked(old: dict | None, dtypes: tuple[str, ...]) -> dict:
    """The checked entries of ``old`` whose dtype is not recompiled now (``produced["checked_by_dtype"]`` keeps what
    they were checked with)."""
    compiled = _with_float16(dtypes)
    return {name: entry for name, entry in (old or {}).get("tile_configs", {}).items()
            if name.split()[1] not in compiled and "checked" in entry}


def write_heuristic_defaults(
    directory: Path = shipped.DEFAULTS_DIR,
    force: bool = False,
    compile_check: bool = False,
    targets: Iterable[str] = AOT_TARGETS,
    variants: Iterable[str] | None = None,
    dtypes: Iterable[str] = ("bfloat16",),
    pythons: Iterable[str | None] = (None,),
) -> list[Path]:
    """(Re)write the unmeasured defaults of each target whose configs changed; measured ones stay.

    ``compile_check``: compile every bf16 entry for its target (``verify_document``), shrink what
    is rejected, and give fp16 the bf16 result; the file is then rewritten in any case.  ``variants``: the
    ``aot_report.CHECKED_VARIANTS`` a config must fit with (default: all of them).  ``dtypes``: the dtypes compiled
    ("bfloat16", whose result float16 takes, and "float32"); the checked entries of a dtype left out keep what the
    target's file held.  ``pythons``: the interpreters whose Triton compiles (None: this one), so a config ships only
    if it fits under each (the oldest and newest Triton supported).  The document records, per dtype, the variants,
    Triton versions and record format its entries were checked with (``produced["checked_by_dtype"]``), every dtype
    checked (``produced["dtypes_checked"]``) and the variants all of them were checked with
    (``produced["variants_checked"]``).
    """
    dtypes = tuple(dtypes)
    if compile_check and (not dtypes or set(dtypes) - {"bfloat16", "float32"}):
        raise ValueError(f"dtypes: expected bfloat16 and/or float32 (float16 takes bfloat16's result), "
                         f"got {list(dtypes)}")
    written = []
    directory.mkdir(parents=True, exist_ok=True)
    for target in targets:
        path = directory / f"{target}.json"
        new = shipped.heuristic_document(target)
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("measured"):
            continue
        if compile_check:
            checked = tuple(ALL_VARIANTS if variants is None else variants)
            variants_checked = list(dict.fromkeys(("plain", *checked)))
            kept = _kept_checked(old, dtypes)
            seeds = {name: TileConfig.from_dict(entry["config"])
                     for name, entry in (old or {}).get("tile_configs", {}).items() if "config" in entry}
            for line in verify_document(new, target, dtypes=dtypes, variants=checked, seeds=seeds,
                                               pythons=pythons):
                print(line, flush=True)
            if "bfloat16" in dtypes:
                copy_checked(new)
                for line in compile_copied(new, target, variants=checked, pythons=pythons):
                    print(line, flush=True)
            new["tile_configs"].update(kept)
            earlier = (old or {}).get("produced", {}).get("dtypes_checked", []) if kept else []
            done = _with_float16(dtypes) | set(earlier)
            new["produced"]["how"] += " --compile-check" + (
                "" if set(checked) == set(ALL_VARIANTS) else f" --variants {','.join(checked)}")
            by_dtype = _checked_by_dtype(old if kept else None, _with_float16(dtypes), variants_checked, pythons)
            new["produced"]["checked_by_dtype"] = by_dtype
            new["produced"]["variants_checked"] = [v for v in variants_checked  # those every checked dtype had
                                                   if all(v in record["variants"] for record in by_dtype.values())]
            new["produced"]["dtypes_checked"] = [d for d in ("bfloat16", "float16", "float32") if d in done]
        elif old is not None and same_configs(old, new) and not force:
            continue
        path.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    shipped.load_target.cache_clear()
    return written


def add_defaults_parser(subparsers):
    """Add ``defaults`` to the ``python -m dispatchattn`` subcommands."""
    parser = subparsers.add_parser("defaults", help="regenerate the unmeasured shipped tile-config defaults",
                                   description="Regenerate the unmeasured shipped tile-config defaults.")
    parser.add_argument("--write", action="store_true", help="write defaults/<target>.json per AOT target")
    parser.add_argument("--force", action="store_true", help="rewrite even when no config changed")
    parser.add_argument("--compile-check", action="store_true",
                        help="compile each bf16 config ahead of time for its target; shrink what is rejected")
    parser.add_argument("--targets", default=",".join(AOT_TARGETS), help="comma-separated targets")
    parser.add_argument("--variants", default=None,
                        help="with --compile-check: comma-separated variants a config must fit with (default: all of "
                             "plain, causal, sliding_window, softcap, alibi, relative_bias, clamped_bias, "
                             "bucketed_bias; 'plain' is the fastest)")
    parser.add_argument("--triton-python", action="append", default=None, metavar="PYTHON",
                        help="with --compile-check: compile with the Triton of this Python interpreter (repeat for "
                             "several: a config ships only if it fits under each; 'self' is this interpreter; "
                             "default: this interpreter only)")
    parser.add_argument("--dtypes", default="bfloat16",
                        help="with --compile-check: comma-separated dtypes to compile, of bfloat16 (float16 takes its "
                             "result) and float32 (fp32 dots are IEEE: FMA on NVIDIA and RDNA3, MFMA on CDNA); the "
                             "others keep the checked entries the file holds (default: bfloat16)")
    parser.set_defaults(print_help=parser.print_help)
    return parser


def run_defaults(args) -> int:
    """Run ``python -m dispatchattn defaults``; without ``--write`` print the help (exit 2)."""
    if not args.write:
        args.print_help()
        return 2
    targets = [t for t in args.targets.split(",") if t]
    variants = [v for v in args.variants.split(",") if v] if args.variants else None
    pythons = [None if p == "self" else p for p in args.triton_python or ["self"]]
    for path in write_heuristic_defaults(force=args.force, compile_check=args.compile_check, targets=targets,
                                         variants=variants, dtypes=[d for d in args.dtypes.split(",") if d],
                                         pythons=pythons):
        print(f"wrote {path}")
    return 0
