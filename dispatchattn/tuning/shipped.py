"""Shipped default tile configs: one JSON file per GPU target in ``tuning/defaults/``.

Each file says where its configs came from (``measured``, ``source``, ``produced``: device, date,
versions, how).  Until a GPU was available to this project every file was generated from the heuristic
(``python -m dispatchattn defaults --write``, ``tools/defaults.py``) and says ``"measured": false``; tuning on a
GPU with ``python -m dispatchattn tune ... --export-defaults`` replaces entries one by one, each marked
``"measured": true`` with its own device, date, versions and speedup.

Entries are keyed by kernel, dtype and head dims rounded up to a power of two (the kernels pad to it).

An entry holds ``config`` (what ships), or, where the ahead-of-time compile found every config tried spilling
(``defaults --compile-check``, ``tools/compile_check.py``), no ``config`` but ``no_spill_free_tile``: the
least-spilling tile tried and what each launch spilled with it.  ``refusal`` reads it; the triton_flex backend
then refuses that kernel on that target (reason code ``no_spill_free_tile``) rather than run a spilling config.
"""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import version
from ..capabilities import installed_libraries
from ..vendor_tables import ARCHS
from . import store
from .config import TileConfig
from .space import KERNELS, heuristic_config_and_note, pow2_at_least, why_config_invalid

DEFAULTS_DIR = Path(__file__).with_name("defaults")
if TYPE_CHECKING:
    from .measure import TuneResult

HEURISTIC_SOURCE = "heuristic (FlexAttention defaults table), not timed on hardware"
SHIPPED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SHIPPED_HEAD_DIMS = (64, 128, 256)


def entry_name(kernel: str, dtype_name: str, head_dim: int, head_dim_v: int) -> str:
    """``"fwd float16 d128/128"``: the head dims rounded up to the power of two the kernel pads to."""
    return f"{kernel} {dtype_name} d{pow2_at_least(head_dim)}/{pow2_at_least(head_dim_v)}"


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
    padded = pow2_at_least(max(head_dim, head_dim_v))
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
            "how": "python -m dispatchattn defaults --write",
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
