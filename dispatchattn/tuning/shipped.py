"""Shipped default tile configs: one JSON file per GPU target in ``tuning/defaults/``.

Each file says where its configs came from (``measured``, ``source``, ``produced``: device, date,
versions, how).  Until a GPU was available to this project every file was generated from the heuristic
(``python -m dispatchattn.tuning.shipped --write``) and says ``"measured": false``; tuning on a
GPU with ``python -m dispatchattn tune ... --export-defaults`` replaces entries one by one, each marked
``"measured": true`` with its own device, date, versions and speedup.

Entries are keyed by kernel, dtype and head dims rounded up to a power of two (the kernels pad to it).

An entry holds ``config`` (what ships), or, where the ahead-of-time compile found every config tried spilling
(``--compile-check``, ``verify.py``), no ``config`` but ``no_spill_free_tile``: the least-spilling tile tried and
what each launch spilled with it.  ``refusal`` reads it; the triton_flex backend then refuses that kernel on that
target (reason code ``no_spill_free_tile``) rather than run a spilling config.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import version
from ..capabilities import AOT_TARGETS, ARCHS, installed_libraries
from . import store
from .config import TileConfig
from .space import KERNELS, _pow2_at_least, heuristic_config_and_note, why_config_invalid

DEFAULTS_DIR = Path(__file__).with_name("defaults")
if TYPE_CHECKING:
    from .measure import TuneResult

HEURISTIC_SOURCE = "heuristic (FlexAttention defaults table), not timed on hardware"
SHIPPED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SHIPPED_HEAD_DIMS = (64, 128, 256)


def entry_name(kernel: str, dtype_name: str, head_dim: int, head_dim_v: int) -> str:
    """``"fwd float16 d128/128"``: the head dims rounded up to the power of two the kernel pads to."""
    return f"{kernel} {dtype_name} d{_pow2_at_least(head_dim)}/{_pow2_at_least(head_dim_v)}"


@functools.cache
def load_target(target: str, directory: Path = DEFAULTS_DIR) -> dict | None:
    """The shipped document for ``target`` ("sm_90"), or None when there is none or it is unusable."""
    path = directory / f"{target}.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if store.why_document_invalid(document) is None else None


def lookup(
    kernel: str, arch: str, dtype_name: str, head_dim: int, head_dim_v: int, directory: Path = DEFAULTS_DIR
) -> tuple[TileConfig, str] | None:
    """(config, source sentence) from the shipped defaults of ``arch``, or None."""
    document = load_target(arch, directory)
    if document is None:
        return None
    entry = document["tile_configs"].get(entry_name(kernel, dtype_name, head_dim, head_dim_v))
    if not isinstance(entry, dict):
        return None
    try:
        config = TileConfig.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError):
        return None
    return config, describe(document, entry, arch)


#: Kernel kinds and launches as a refusal names them.
KERNEL_WORDS = {"fwd": "forward", "bwd": "backward", "decode": "decoding"}
LAUNCH_WORDS = {"fwd": "forward", "bwd_dkdv": "dK/dV", "bwd_dq": "dQ", "decode": "decoding",
                "decode_reduce": "reduction"}


def refusal(
    kernel: str, arch: str, dtype_name: str, head_dim: int, head_dim_v: int, directory: Path = DEFAULTS_DIR
) -> dict | None:
    """The ``no_spill_free_tile`` record of the shipped entry, or None (a config ships, or nothing is known).

    An entry measured on hardware (tuned) never refuses: it ships the config that was timed.
    """
    document = load_target(arch, directory)
    if document is None:
        return None
    entry = document["tile_configs"].get(entry_name(kernel, dtype_name, head_dim, head_dim_v))
    if not isinstance(entry, dict) or "config" in entry or entry.get("measured"):
        return None
    found = entry.get("no_spill_free_tile")
    return found if isinstance(found, dict) and isinstance(found.get("least_spilling"), dict) else None


def refusal_message(
    kernel: str, arch: str, head_dim: int, head_dim_v: int, record: dict, dtype_name: str | None = None
) -> str:
    """``on gfx1100 every backward (dQ) tile spills at head_dim 128 in bfloat16 (least: 16x16 w8, dQ 34 VGPRs
    spilled; ...); triton_flex is not offered there``."""
    least = record["least_spilling"]
    launches = {name: spill for name, spill in least.get("launches", {}).items()
                if spill.get("spilled_registers") or spill.get("spill_bytes")}
    amd = any(spill.get("spilled_registers") for spill in launches.values())
    parts = [
        f"{LAUNCH_WORDS.get(name, name)} " + (f"{spill['spilled_registers']} VGPRs spilled" if amd
                                               else f"{spill.get('spill_bytes', 0):,} B spilled")
        for name, spill in launches.items()
    ]
    which = ""
    if kernel == "bwd" and len(launches) == 1:
        which = f" ({LAUNCH_WORDS.get(next(iter(launches)), '')})"
    padded = _pow2_at_least(max(head_dim, head_dim_v))
    dims = f"head_dim {head_dim}" if head_dim == head_dim_v else f"head_dim {head_dim} / {head_dim_v}"
    if padded != max(head_dim, head_dim_v):
        dims += f" (padded to {padded})"
    spilled = ", ".join(parts) if parts else "spills"
    if dtype_name:
        dims += f" in {dtype_name}"
    return (f"on {arch} every {KERNEL_WORDS.get(kernel, kernel)}{which} tile spills at {dims} "
            f"(least: {least.get('tile', '?')}, {spilled}; {record.get('configs_tried', '?')} configs compiled ahead "
            f"of time with Triton {record.get('triton', '?')}); triton_flex is not offered there")


def describe(document: dict, entry: dict, arch: str) -> str:
    """``shipped default (not measured) for sm_90: ...`` or ``shipped default (measured on H100, date)``.

    ``measured`` is per entry where an entry says so (a partly tuned file), else the file's.
    """
    if entry.get("measured", document.get("measured")):
        produced = {**document.get("produced", {}), **entry.get("produced", {})}
        device, date = produced.get("device", arch), produced.get("date", "undated")
        return f"shipped default (measured on {device}, {date})"
    text = f"shipped default (not measured) for {arch}: {document.get('source', HEURISTIC_SOURCE)}"
    spills = entry.get("variant_spills")
    if isinstance(spills, dict) and spills:
        text += "; " + variant_spill_warning(spills)
    return text


def variant_spill_warning(spills: dict) -> str:
    """``with this tile dK/dV spills registers when the mods are causal (37 VGPRs), alibi (38 VGPRs) (compiled
    ahead of time; no tile tried fits them all): python -m dispatchattn tune ...`` for an entry's
    ``variant_spills``."""
    launches = dict.fromkeys(launch for per_variant in spills.values() for launch in per_variant)
    parts = []
    for variant, per_variant in spills.items():
        worst = max(per_variant.values(), key=lambda s: (s.get("spilled_registers", 0), s.get("spill_bytes", 0)))
        amount = (f"{worst['spilled_registers']} VGPRs" if worst.get("spilled_registers")
                  else f"{worst.get('spill_bytes', 0):,} B")
        parts.append(f"{variant} ({amount})")
    return (f"with this tile {', '.join(LAUNCH_WORDS.get(launch, launch) for launch in launches)} spills registers "
            f"when the mods are {', '.join(parts)} (compiled ahead of time; no tile tried fits them all): tune it on "
            "the device with `python -m dispatchattn tune`")


def export_measured(result: TuneResult, directory: Path = DEFAULTS_DIR) -> Path:
    """Record a ``TuneResult`` as the measured shipped default of its arch, kernel, dtype and head dims.

    The target's file keeps its other entries (heuristic ones stay marked not measured); the entry
    records the device, date, versions, the problem it was tuned on and its speedup over the heuristic.
    """
    key = result.key
    path = directory / f"{key.arch}.json"
    document = load_target(key.arch, directory) or heuristic_document(key.arch)
    document = json.loads(json.dumps(document))  # a private copy of the cached document
    for entry in document["tile_configs"].values():  # entries from before keep their own provenance
        entry.setdefault("measured", bool(document.get("measured")))
    document.update(measured=True, source="tuned on hardware with `python -m dispatchattn tune`")
    document["tile_configs"][entry_name(key.kernel, key.dtype, key.head_dim, key.head_dim_v)] = {
        "config": result.best.to_dict(),
        "measured": True,
        "seconds": result.best_seconds,
        "speedup_over_heuristic": round(result.speedup, 4),
        "tuned_for": key.entry,
        "produced": {
            "device": key.device_name,
            "date": datetime.date.today().isoformat(),
            "dispatchattn": key.dispatchattn,
            "triton": key.triton,
            "torch": str(installed_libraries().torch),
            "how": f"python -m dispatchattn tune ({len(result.timings)} candidates timed with do_bench)",
        },
    }
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    load_target.cache_clear()
    return path


def heuristic_document(target: str) -> dict:
    """The shipped-defaults document for ``target`` generated from the heuristic (nothing measured)."""
    document = store.empty_document({})
    document.update(
        target=target,
        measured=False,
        source=HEURISTIC_SOURCE,
        produced={
            "device": f"none (generated for {target}, {ARCHS[target].flagship}, without the hardware)",
            "date": datetime.date.today().isoformat(),
            "dispatchattn": version.__version__,
            "triton": str(installed_libraries().triton),
            "how": "python -m dispatchattn.tuning.shipped --write",
        },
    )
    for kernel in KERNELS:
        for dtype in SHIPPED_DTYPES:
            for head_dim in SHIPPED_HEAD_DIMS:
                config, note = heuristic_config_and_note(kernel, target, dtype, head_dim, head_dim)
                if why_config_invalid(kernel, config, target, dtype, head_dim, head_dim):
                    continue  # nothing in the table fits this target: no default to ship
                name = entry_name(kernel, str(dtype).removeprefix("torch."), head_dim, head_dim)
                document["tile_configs"][name] = {"config": config.to_dict(), "note": note}
    return document


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
    from ..backends.triton_flex import aot, aot_cache

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
    directory: Path = DEFAULTS_DIR,
    force: bool = False,
    compile_check: bool = False,
    targets: Iterable[str] = AOT_TARGETS,
    variants: Iterable[str] | None = None,
    dtypes: Iterable[str] = ("bfloat16",),
    pythons: Iterable[str | None] = (None,),
) -> list[Path]:
    """(Re)write the unmeasured defaults of each target whose configs changed; measured ones stay.

    ``compile_check``: compile every bf16 entry for its target (``verify.verify_document``), shrink what
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
        new = heuristic_document(target)
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("measured"):
            continue
        if compile_check:
            from . import verify

            checked = tuple(verify.ALL_VARIANTS if variants is None else variants)
            variants_checked = list(dict.fromkeys(("plain", *checked)))
            kept = _kept_checked(old, dtypes)
            seeds = {name: TileConfig.from_dict(entry["config"])
                     for name, entry in (old or {}).get("tile_configs", {}).items() if "config" in entry}
            for line in verify.verify_document(new, target, dtypes=dtypes, variants=checked, seeds=seeds,
                                               pythons=pythons):
                print(line, flush=True)
            if "bfloat16" in dtypes:
                verify.copy_checked(new)
                for line in verify.compile_copied(new, target, variants=checked, pythons=pythons):
                    print(line, flush=True)
            new["tile_configs"].update(kept)
            earlier = (old or {}).get("produced", {}).get("dtypes_checked", []) if kept else []
            done = _with_float16(dtypes) | set(earlier)
            new["produced"]["how"] += " --compile-check" + (
                "" if set(checked) == set(verify.ALL_VARIANTS) else f" --variants {','.join(checked)}")
            by_dtype = _checked_by_dtype(old if kept else None, _with_float16(dtypes), variants_checked, pythons)
            new["produced"]["checked_by_dtype"] = by_dtype
            new["produced"]["variants_checked"] = [v for v in variants_checked  # those every checked dtype had
                                                   if all(v in record["variants"] for record in by_dtype.values())]
            new["produced"]["dtypes_checked"] = [d for d in ("bfloat16", "float16", "float32") if d in done]
        elif old is not None and same_configs(old, new) and not force:
            continue
        path.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    load_target.cache_clear()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the unmeasured shipped tile-config defaults.")
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
    args = parser.parse_args(argv)
    if not args.write:
        parser.print_help()
        return 2
    targets = [t for t in args.targets.split(",") if t]
    variants = [v for v in args.variants.split(",") if v] if args.variants else None
    pythons = [None if p == "self" else p for p in args.triton_python or ["self"]]
    for path in write_heuristic_defaults(force=args.force, compile_check=args.compile_check, targets=targets,
                                         variants=variants, dtypes=[d for d in args.dtypes.split(",") if d],
                                         pythons=pythons):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
